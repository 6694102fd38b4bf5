"""Text in, token-id batches out. Import from the module that does the job (explicit imports, no
re-exports here: every import of a submodule runs this file first, and re-exports made `tformer download`,
which needs only the standard library, import torch and sentencepiece before fetching a file):

- `tformer.data.corpus`: reading and validating parallel text (`read_parallel`, `read_tsv`, `CorpusError`);
- `tformer.data.tokenizer`: the sentencepiece tokenizer (`Tokenizer`, `normalize`);
- `tformer.data.batching`: token-budget batching (`plan_batches`, `BatchStream`, `collate`, `shard`);
- `tformer.data.encoded`: the token ids of a corpus, encoded once and cached;
- `tformer.data.numbers`: the built-in English -> German number-words corpus of `tformer demo`;
- `tformer.data.download`: the Multi30k download (standard library only).
"""
