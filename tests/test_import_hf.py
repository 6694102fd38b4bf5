"""`tformer import-hf`: a MarianMT directory laid out like OPUS-MT's (separate source/target sentencepiece
models, one vocab.json whose ids differ from the models' own, eos = 0, unk = 1, pad = decoder start =
the last id, swish, a final-logits bias, pad banned by bad_words_ids) becomes a run that tokenizes like
`MarianTokenizer` and translates token for token like `generate()`, greedy and beam."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from helpers import non_utf8_directory
from safetensors.torch import load_file, save_file

from tformer.cli.main import main
from tformer.decoding.pipeline import Translator
from tformer.interop.hf_import import import_hf
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.training.checkpoint_load import load_run

transformers = pytest.importorskip("transformers")

SOURCES = ["the cat sat on the mat", "a dog runs in the park", "hello world how are you", "we like small models"]
TARGETS = ["die katze sass auf der matte", "ein hund rennt im park", "hallo welt wie geht es", "wir moegen modelle"]
SENTENCES = ["the cat runs", "hello dog", "a small model sat in the park", "we", "how are you world"]
MAX_LENGTH = 12  # generation_config max_length: decoder start + 10 tokens + forced eos
EOS_BOOST = 3.0  # eos: some outputs end before max_length, some reach it


def train_spm(sentences: list[str], vocab_size: int) -> bytes:
    """A sentencepiece model with Marian's own special ids (unk 0, bos 1, eos 2)."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 3), model_writer=writer, vocab_size=vocab_size, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )  # fmt: skip
    return writer.getvalue()


def write_marian_dir(directory: Path, *, weights: str, pad_bias: float = -30.0, tie: bool = True) -> Path:
    """A random MarianMT model with OPUS-MT's file layout and conventions (`tie=False`: Hugging Face's
    untied model, whose encoder embeddings, decoder embeddings and lm_head are three matrices)."""
    directory.mkdir()
    protos = {"source.spm": train_spm(SOURCES, 40), "target.spm": train_spm(TARGETS, 40)}
    vocab = {"</s>": 0, "<unk>": 1}
    for proto in protos.values():
        model = spm.SentencePieceProcessor(model_proto=proto)
        for index in range(model.get_piece_size()):
            if not model.is_control(index) and not model.is_unknown(index):
                vocab.setdefault(model.id_to_piece(index), len(vocab))
    vocab["<pad>"] = pad = len(vocab)
    config = transformers.MarianConfig(
        vocab_size=pad + 1, decoder_vocab_size=pad + 1, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        activation_function="swish", max_position_embeddings=64, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, scale_embedding=True, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
        model.final_logits_bias.normal_(0.0, 1.0)
        model.final_logits_bias[0, 0] += EOS_BOOST
        model.final_logits_bias[0, pad] = pad_bias  # > 0: pad would win most steps if it were not banned
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=pad, eos_token_id=0, pad_token_id=pad, forced_eos_token_id=0, bad_words_ids=[[pad]],
        num_beams=3, max_length=MAX_LENGTH, no_repeat_ngram_size=2,
    )  # fmt: skip
    model.save_pretrained(directory)
    if weights == "bin":  # the older format: read with torch.load(weights_only=True)
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    for name, proto in protos.items():
        (directory / name).write_bytes(proto)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": False}), encoding="utf-8")
    return directory


def hf_generate(model, tokenizer, **options) -> list[list[int]]:
    outputs = []
    for sentence in SENTENCES:
        with torch.no_grad():
            sequence = model.generate(**tokenizer([sentence], return_tensors="pt"), **options)[0].tolist()
        tokens = sequence[1:]
        outputs.append(tokens[: tokens.index(0)] if 0 in tokens else tokens)
    return outputs


# pad_bias -30: pad as improbable as in a trained OPUS-MT model. pad_bias 8: pad would win most steps
# unbanned, so greedy and beam search agree with HF only if the ban is applied exactly as HF applies it.
@pytest.mark.parametrize(("weights", "pad_bias"), [("safetensors", -30.0), ("bin", 8.0)])
def test_imported_run_tokenizes_and_translates_like_generate(tmp_path, weights, pad_bias):
    hf_dir = write_marian_dir(tmp_path / "opus-mt-xx-yy", weights=weights, pad_bias=pad_bias)
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    loaded = load_run(tmp_path / "run")
    tokenizer = loaded.tokenizer
    assert isinstance(tokenizer, VocabTokenizer)
    pad = loaded.model.config.pad_id
    assert (tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id, tokenizer.bos_id) == (0, 1, pad, pad)
    assert loaded.experiment.decode.banned_ids == (pad,)
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    for sentence in SENTENCES:
        assert hf_tokenizer(sentence).input_ids == [*tokenizer.encode_source(sentence), tokenizer.eos_id]

    decode = loaded.experiment.decode
    assert (decode.beam_size, decode.max_len_b, decode.length_normalization) == (3, MAX_LENGTH - 1, "average")
    assert decode.forced_eos and not decode.early_stopping
    greedy_config = dataclasses.replace(decode, beam_size=1)
    greedy = [t[0].tokens for t in Translator(loaded.model, tokenizer, greedy_config).translate(SENTENCES)]
    assert greedy == hf_generate(hf_model, hf_tokenizer, num_beams=1)
    assert {len(tokens) < MAX_LENGTH - 2 for tokens in greedy} == {True, False}, "cover eos endings and cut ones"
    assert pad not in {token for tokens in greedy for token in tokens}
    beam = [t[0].tokens for t in Translator(loaded.model, tokenizer, decode).translate(SENTENCES)]
    assert beam == hf_generate(hf_model, hf_tokenizer)  # the generation_config's settings: 3 beams

    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    arguments = ["translate", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt")]
    assert main([*arguments, "--output", str(tmp_path / "out.txt")]) == 0
    expected = hf_tokenizer.batch_decode(hf_generate(hf_model, hf_tokenizer), skip_special_tokens=True)
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    for line, text, tokens in zip(lines, expected, beam, strict=True):
        if tokenizer.unk_id not in tokens:  # HF drops <unk> when skipping special tokens
            assert line == text


def test_an_untied_output_projection_is_imported_as_one(tmp_path):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors", tie=False)
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    loaded = load_run(tmp_path / "run")
    config = loaded.model.config
    assert not config.tie_output and not config.share_embeddings and config.layer_norm_eps == 1e-5
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    assert not torch.equal(hf_model.lm_head.weight, hf_model.model.decoder.embed_tokens.weight)
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    src = hf_tokenizer(SENTENCES[2:3], return_tensors="pt").input_ids
    tgt = torch.tensor([[config.pad_id, 5, 9, 3, 7, 12]])  # the decoder start token, then any tokens
    with torch.no_grad():
        expected = hf_model(input_ids=src, decoder_input_ids=tgt).logits
        actual = loaded.model(src, tgt)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    greedy_config = dataclasses.replace(loaded.experiment.decode, beam_size=1)
    greedy = [t[0].tokens for t in Translator(loaded.model, loaded.tokenizer, greedy_config).translate(SENTENCES)]
    assert greedy == hf_generate(hf_model, hf_tokenizer, num_beams=1)


def test_a_tied_decoder_embedding_stored_only_as_lm_head_is_imported(tmp_path):
    """Separate source and target embeddings, the output tied to the target's: a file may keep the tied
    matrix under lm_head.weight alone, and the decoder's embedding must then be read from it."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    raw = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    (hf_dir / "config.json").write_text(json.dumps(raw | {"share_encoder_decoder_embeddings": False}), encoding="utf-8")
    state = load_file(hf_dir / "model.safetensors")
    embedding = hf_model.model.shared.weight.detach().clone()
    for name in ("model.shared.weight", "model.decoder.embed_tokens.weight"):
        state.pop(name, None)
    state |= {"model.encoder.embed_tokens.weight": embedding, "lm_head.weight": embedding.clone()}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    loaded = load_run(tmp_path / "run")
    assert loaded.model.config.tie_output and not loaded.model.config.share_embeddings
    src = transformers.MarianTokenizer.from_pretrained(hf_dir)(SENTENCES[2:3], return_tensors="pt").input_ids
    tgt = torch.tensor([[loaded.model.config.pad_id, 5, 9, 3, 7, 12]])
    with torch.no_grad():
        expected = hf_model(input_ids=src, decoder_input_ids=tgt).logits
        actual = loaded.model(src, tgt)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_a_resume_of_an_imported_run_is_refused_in_one_line(tmp_path, capsys):
    """An imported run names no training text: `train --resume` of it (which `plot` of it suggests) failed
    with an AssertionError traceback in prepare_data; it is refused in one line, the run left as it was."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    run = tmp_path / "run"
    assert main(["import-hf", str(hf_dir), "--out", str(run)]) == 0
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "10"]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: nothing to resume in {run}: it was not trained by tformer train")
    assert message.count("\n") == 1
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_half_precision_weights_are_imported_exactly_as_float32_and_the_summary_says_so(tmp_path, capsys, dtype):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    transformers.MarianMTModel.from_pretrained(hf_dir).to(getattr(torch, dtype)).save_pretrained(hf_dir)
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    note = "" if dtype == "float32" else f" (weights stored as {dtype} in {hf_dir}, imported exactly as float32)"
    assert capsys.readouterr().out == f"wrote {tmp_path / 'run'}{note}\n"
    loaded = load_run(tmp_path / "run")
    experiment = json.loads((tmp_path / "run" / "checkpoints" / "step-00000000" / "experiment.json").read_text())
    assert experiment["imported_from"]["stored_dtypes"] == [dtype]
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert torch.equal(loaded.model.src_embedding.weight, hf_model.model.shared.weight)
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    src = hf_tokenizer(SENTENCES[2:3], return_tensors="pt").input_ids
    tgt = torch.tensor([[loaded.model.config.pad_id, 5, 9, 3, 7, 12]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(src, tgt), hf_model(input_ids=src, decoder_input_ids=tgt).logits, atol=1e-5, rtol=0
        )


def test_import_of_a_missing_path_or_a_file_names_the_argument(tmp_path: Path, capsys) -> None:
    """A path that does not exist, or a file (config.json itself), was 'not a Hugging Face model directory (no
    config.json)': it is said as other commands say it of their directories, naming HF_DIR, before anything."""
    config = tmp_path / "config.json"
    config.write_text("{}", encoding="utf-8")
    missing = tmp_path / "nope"
    cases = [
        (missing, f"HF_DIR {missing}: no such directory; give the directory of a Hugging Face model"),
        (config, f"HF_DIR {config} is a file; give the directory that holds the Hugging Face model"),
    ]
    for path, message in cases:
        assert main(["import-hf", str(path), "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(ValueError, match=r": no such directory; give the directory of a Hugging Face model$"):
        import_hf(missing, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert "no config.json" in capsys.readouterr().err
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    (hf_dir / "model.safetensors").unlink()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    assert "holds no weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_sharded_weights_are_imported_like_one_file_and_a_missing_shard_is_named(tmp_path, capsys, weights):
    """save_pretrained(max_shard_size=...) writes model-0000i-of-0000n files and an index (weight_map: name ->
    file); the import said the directory "holds no weights"."""
    whole = write_marian_dir(tmp_path / "whole", weights=weights)
    hf_dir = tmp_path / "sharded"
    hf_dir.mkdir()
    for path in whole.iterdir():
        if not path.name.startswith(("model", "pytorch_model")):
            (hf_dir / path.name).write_bytes(path.read_bytes())
    state = transformers.MarianMTModel.from_pretrained(whole).state_dict()
    names = sorted(name for name in state if "embed_positions" not in name and name != "model.shared.weight")
    shards = [names[i::3] for i in range(3)]
    suffix = "safetensors" if weights == "safetensors" else "bin"
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"{'model' if weights == 'safetensors' else 'pytorch_model'}-0000{index}-of-00003.{suffix}"
        tensors = {name: state[name].clone().contiguous() for name in shard}
        if weights == "safetensors":
            save_file(tensors, hf_dir / file, metadata={"format": "pt"})
        else:
            torch.save(tensors, hf_dir / file)
        weight_map |= dict.fromkeys(shard, file)
    index_name = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    (hf_dir / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert main(["import-hf", str(whole), "--out", str(tmp_path / "from_whole")]) == 0
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "from_shards")]) == 0
    expected, actual = load_run(tmp_path / "from_whole").model.state_dict(), load_run(tmp_path / "from_shards").model
    for name, tensor in actual.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    (hf_dir / file).unlink()
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {hf_dir / index_name} names {file}, which is not in {hf_dir}\n"
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"final_logits_bias": 3}], ids=["list", "int"])
def test_a_pytorch_model_bin_that_is_not_a_state_dict_is_refused_in_one_line(tmp_path, capsys, content):
    """torch.load(weights_only=True) reads any list or dict of plain values: they gave an AttributeError."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="bin")
    torch.save(content, hf_dir / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    expected = f"error: {hf_dir / 'pytorch_model.bin'}: not a state dict (tensor names to tensors)\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "run").exists()


def test_a_directory_whose_path_is_not_valid_utf8_is_imported(tmp_path):
    """safetensors refuses a path that is not valid UTF-8: the import called the weights corrupt."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    moved = Path(shutil.copytree(hf_dir, non_utf8_directory(tmp_path) / "hf"))
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "expected")]) == 0
    assert main(["import-hf", str(moved), "--out", str(moved.parent / "run")]) == 0
    expected = load_run(tmp_path / "expected").model.state_dict()
    for name, tensor in load_run(moved.parent / "run").model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_safetensors_file_is_refused_in_one_line(tmp_path, capsys, damage):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    weights = hf_dir / "model.safetensors"
    damaged = {"garbage": b"not a safetensors file", "truncated": weights.read_bytes()[:4000], "empty": b""}
    weights.write_bytes(damaged[damage])
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {weights}: corrupt or truncated") and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "value"), [("d_model", "32"), ("encoder_layers", None), ("scale_embedding", "yes")]
)
def test_a_config_json_field_of_the_wrong_type_is_refused_in_one_line(tmp_path, capsys, setting, value):
    """transformers (5) checks the fields with an error type of huggingface_hub's: it was a traceback."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, setting: value}))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and setting in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_decoder_start_id_outside_the_vocabulary_names_the_setting(tmp_path, capsys):
    """It said "bos id 99999 is not in the target vocabulary": no file, no setting named."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).exists():
            settings = json.loads((hf_dir / name).read_text())
            (hf_dir / name).write_text(json.dumps({**settings, "decoder_start_token_id": 99999}))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {hf_dir}: the decoder start id 99999 (decoder_start_token_id")
    assert error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("setting", "value"), [("vocab_size", 60), ("decoder_ffn_dim", 48)])
def test_weights_that_do_not_fit_config_json_are_refused_in_one_line(tmp_path, capsys, setting, value):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    config[setting] = value
    config["encoder_ffn_dim"] = config["decoder_ffn_dim"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {hf_dir}: the weights do not fit config.json: ") and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"activation_function": "gelu_new"},
            "activation_function='gelu_new' has no tformer counterpart (tformer has ",
        ),
        ({"decoder_attention_heads": 2}, "encoder_attention_heads=4 but decoder_attention_heads=2"),
        ({"decoder_ffn_dim": 32}, "encoder_ffn_dim=64 but decoder_ffn_dim=32"),
    ],
)
def test_an_architecture_tformer_lacks_is_refused_naming_the_setting(tmp_path, capsys, changes, message):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **changes}))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot import: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_config_json_tformer_cannot_build_names_the_file(tmp_path, capsys):
    """d_model not divisible by the head count: the message named tformer's fields, not the file."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "d_model": 30}))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    expected = f"error: {hf_dir / 'config.json'}: d_model (30) must be divisible by n_heads (4)\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["encoder_layers", "decoder_layers"])
def test_a_config_json_too_large_for_the_memory_is_refused_before_anything_is_built(tmp_path, capsys, key):
    """A received config.json asking for 1e8 layers filled the memory until the process was killed: the
    weights' per-layer names were built before Transformer(config) checked the model's size. It is now
    checked first, and the message names the file."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, key: 10**8}))
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {hf_dir / 'config.json'}: this model holds ") and err.count("\n") == 1, err
    assert "GiB of memory here" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("missing", "the weights lack model.decoder.layers.1.fc2.bias; is this a MarianMT checkpoint?"),
        (
            "layer beyond config.json",
            "the weights hold model.encoder.layers.2.fc1.weight, which config.json's MarianMT model has no place for",
        ),
        (
            "not Marian's",
            "the weights hold model.encoder.layernorm_embedding.bias (and 1 more), which config.json's MarianMT "
            "model has no place for",
        ),
    ],
)
def test_weights_missing_or_beyond_what_config_json_describes_are_refused_in_one_line(
    tmp_path, capsys, change, expected
):
    """Weights config.json has no place for (a third layer when it says two, a BART layer norm) were dropped
    without a word: the imported model computed something else than the weights' own."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    state = load_file(hf_dir / "model.safetensors")
    if change == "missing":
        del state["model.decoder.layers.1.fc2.bias"]
    elif change == "layer beyond config.json":
        state["model.encoder.layers.2.fc1.weight"] = torch.zeros(64, 32)
    else:
        state |= {f"model.encoder.layernorm_embedding.{name}": torch.zeros(32) for name in ("weight", "bias")}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: {hf_dir}: {expected}") and message.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["config.json", "vocab.json"])
def test_a_json_file_nested_too_deep_is_refused_in_one_line(tmp_path, capsys, name):
    """json raises RecursionError, not JSONDecodeError, for it: it was a traceback."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    (hf_dir / name).write_text("[" * 100_000)
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {hf_dir / name}: unreadable or corrupt (RecursionError)\n"
    assert not (tmp_path / "run").exists()
