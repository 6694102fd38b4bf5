"""Text in, token-id batches out: corpus reading, sentencepiece tokenization, token-budget batching,
the built-in number-words corpus and the Multi30k download."""

from tformer.data.batching import (
    Batch,
    BatchStream,
    OverlongPairsError,
    batch_cost,
    collate,
    filter_overlong,
    plan_batches,
    plan_sorted,
    shard,
    sorted_batches,
)
from tformer.data.corpus import CorpusError, CorpusReport, ParallelCorpus, read_lines, read_parallel, read_tsv
from tformer.data.download import DownloadError, download_multi30k
from tformer.data.numbers import NumberSplits, make_number_splits, write_number_corpus
from tformer.data.tokenizer import Tokenizer, TokenizerError, normalize

__all__ = [
    "Batch",
    "BatchStream",
    "CorpusError",
    "CorpusReport",
    "DownloadError",
    "NumberSplits",
    "OverlongPairsError",
    "ParallelCorpus",
    "Tokenizer",
    "TokenizerError",
    "batch_cost",
    "collate",
    "download_multi30k",
    "filter_overlong",
    "make_number_splits",
    "normalize",
    "plan_batches",
    "plan_sorted",
    "read_lines",
    "read_parallel",
    "read_tsv",
    "shard",
    "sorted_batches",
    "write_number_corpus",
]
