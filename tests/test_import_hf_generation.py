"""Hugging Face generation settings carried by an import: forced eos and early stopping give generate()'s
beams token for token, also when beams reach the maximum length."""

from __future__ import annotations

import json

import pytest
from test_import_hf import SENTENCES, hf_generate, write_marian_dir

from tformer.decoding.pipeline import Translator
from tformer.interop.hf_import import import_hf
from tformer.training.checkpoint_load import load_run

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=4, max_length=20),  # forced eos: beams reach the limit and end with the forced eos
        dict(num_beams=4, max_length=12, length_penalty=2.0),
        dict(num_beams=4, max_length=20, forced_eos_token_id=None, early_stopping=True),
        dict(num_beams=3, max_length=9, early_stopping=True),
        dict(num_beams=1, max_length=7),
    ],
    ids=["forced-eos", "forced-eos-alpha-2", "early-stopping", "both", "greedy-forced-eos"],
)
def test_imported_beams_equal_generate_at_the_length_limit(tmp_path, settings):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    generation.update(settings)
    (hf_dir / "generation_config.json").write_text(json.dumps(generation))
    import_hf(hf_dir, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    decode = loaded.experiment.decode
    assert decode.forced_eos == (generation.get("forced_eos_token_id") is not None)
    assert decode.early_stopping == bool(generation.get("early_stopping", False))
    ours = [t[0].tokens for t in Translator(loaded.model, loaded.tokenizer, decode).translate(SENTENCES)]
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    assert ours == hf_generate(hf_model, hf_tokenizer)


def test_an_early_stopping_rule_tformer_lacks_is_refused_in_one_line(tmp_path):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    generation["early_stopping"] = "never"
    (hf_dir / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ValueError, match="early_stopping='never' is not supported"):
        import_hf(hf_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("early_stopping", [False, True])
def test_import_then_export_keeps_the_generation_settings(tmp_path, early_stopping):
    """Re-exported, an OPUS-MT-style model decodes in generate() as the original did: banned pad,
    forced eos, early stopping and the length limit survive the round trip."""
    from tformer.interop.hf_export import export_hf

    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors", pad_bias=8.0)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    generation.update(num_beams=4, max_length=16, early_stopping=early_stopping)
    (hf_dir / "generation_config.json").write_text(json.dumps(generation))
    import_hf(hf_dir, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "again", which="last")
    exported = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    for key in ("num_beams", "max_length", "forced_eos_token_id", "bad_words_ids", "early_stopping"):
        assert exported.get(key) == generation.get(key), key
    tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    original = hf_generate(transformers.MarianMTModel.from_pretrained(hf_dir).eval(), tokenizer)
    again = hf_generate(transformers.MarianMTModel.from_pretrained(tmp_path / "again").eval(), tokenizer)
    assert again == original


def rewrite(path, **changes) -> dict:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))
    return document


@pytest.mark.parametrize("layout", ["file-overrides-config", "config-only", "start-token"])
def test_the_imported_decoder_uses_the_settings_generate_uses(tmp_path, layout):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    if layout == "file-overrides-config":  # generate() reads no generation key of config.json then
        generation = json.loads((hf_dir / "generation_config.json").read_text())
        del generation["no_repeat_ngram_size"]
        (hf_dir / "generation_config.json").write_text(json.dumps(generation))
        rewrite(hf_dir / "config.json", no_repeat_ngram_size=1, min_length=6, bad_words_ids=[[5]], length_penalty=3.0)
    elif layout == "config-only":  # config.json's keys as written: no MarianConfig default (forced eos 0)
        config = json.loads((hf_dir / "config.json").read_text())
        del config["forced_eos_token_id"]
        (hf_dir / "config.json").write_text(json.dumps({**config, "num_beams": 2, "max_length": 9}))
        (hf_dir / "generation_config.json").unlink()
    else:  # generate() starts from generation_config.json's decoder start token, not config.json's
        rewrite(hf_dir / "generation_config.json", decoder_start_token_id=1)
    import_hf(hf_dir, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    if layout == "config-only":
        assert hf_model.generation_config.forced_eos_token_id is None and not loaded.experiment.decode.forced_eos
    ours = [
        t[0].tokens for t in Translator(loaded.model, loaded.tokenizer, loaded.experiment.decode).translate(SENTENCES)
    ]
    assert ours == hf_generate(hf_model, transformers.MarianTokenizer.from_pretrained(hf_dir))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
        (dict(forced_bos_token_id=5), "forced_bos_token_id=5"),
        (dict(do_sample=True, num_beams=4), "do_sample=True with num_beams=4 is beam sampling"),
        (dict(do_sample=True, num_beams=1, typical_p=0.5), "typical_p=0.5"),
        (dict(do_sample=True, num_beams=1, min_p=0.1), "min_p=0.1"),
        (dict(do_sample="yes"), "do_sample='yes' must be true or false"),
        (dict(do_sample=True, num_beams=1, top_k=2.5), "top_k=2.5 must be an integer"),
        (dict(num_beam_groups=3, diversity_penalty=0.5), "num_beam_groups=3"),
        (dict(encoder_no_repeat_ngram_size=2), "encoder_no_repeat_ngram_size=2"),
        (dict(suppress_tokens=[7]), "suppress_tokens=[7]"),
        (dict(bad_words_ids=[[43], [5, 6]]), "bad_words_ids entry [5, 6]"),
        (dict(eos_token_id=[0, 5]), "eos_token_id=[0, 5]"),
        (dict(forced_eos_token_id=5), "forced_eos_token_id=5"),
    ],
    ids=lambda value: value.split("=")[0].split()[0] if isinstance(value, str) else "setting",
)
def test_settings_tformer_cannot_reproduce_are_refused_in_one_line(tmp_path, capsys, changes, named):
    _import_is_refused(tmp_path, capsys, changes, named)


@pytest.mark.parametrize(
    "changes",
    [
        # neutral values, and sampling parameters that generate() ignores without do_sample
        dict(repetition_penalty=1.0, num_beam_groups=1, do_sample=False, temperature=0.5, top_k=3, eos_token_id=[0]),
        dict(max_new_tokens=6, max_length=20),  # max_new_tokens wins over max_length
        dict(num_beams=1, min_new_tokens=8, max_length=12),
        dict(min_length=9, min_new_tokens=4, max_length=12),  # min_new_tokens wins over min_length
    ],
    ids=["neutral", "max-new-tokens", "min-new-tokens", "min-new-tokens-wins"],
)
def test_accepted_settings_decode_like_generate(tmp_path, changes):
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    rewrite(hf_dir / "generation_config.json", **changes)
    import_hf(hf_dir, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    ours = [
        t[0].tokens for t in Translator(loaded.model, loaded.tokenizer, loaded.experiment.decode).translate(SENTENCES)
    ]
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    assert ours == hf_generate(hf_model, transformers.MarianTokenizer.from_pretrained(hf_dir))


def test_a_ban_of_eos_is_dropped_as_generate_drops_it(tmp_path):
    """generate() never bans eos (its NoBadWordsLogitsProcessor drops an `[eos]` entry of bad_words_ids), so
    the import keeps only the other bans: banning eos would cut no sentence short and give other tokens."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    pad = generation["bad_words_ids"][0][0]
    rewrite(hf_dir / "generation_config.json", bad_words_ids=[[0], [pad]], num_beams=1)  # eos is 0
    import_hf(hf_dir, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert loaded.experiment.decode.banned_ids == (pad,)
    ours = [
        t[0].tokens for t in Translator(loaded.model, loaded.tokenizer, loaded.experiment.decode).translate(SENTENCES)
    ]
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    theirs = hf_generate(hf_model, transformers.MarianTokenizer.from_pretrained(hf_dir))
    assert ours == theirs
    assert any(len(tokens) < generation["max_length"] - 2 for tokens in theirs), "some sentence should end early"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(num_beams=[4]), "num_beams=[4] must be an integer"),
        (dict(max_length="20"), "max_length='20' must be an integer"),
        (dict(length_penalty="x"), "length_penalty='x' must be a number"),
        (dict(bad_words_ids=5), "bad_words_ids=5 must be a list of lists of token ids"),
        (dict(bad_words_ids=[5]), "bad_words_ids=[5] must be a list of lists of token ids"),
        (dict(num_beams=0), "beam_size must be at least 1, got 0"),
        (dict(num_return_sequences="2"), "num_return_sequences='2' must be an integer"),
        # generate() refuses these too: more sequences than beams, or several from greedy search
        (dict(num_beams=4, num_return_sequences=5), "nbest must be between 1 and beam_size (4), got 5"),
        (dict(num_beams=1, num_return_sequences=2), "nbest must be between 1 and beam_size (1), got 2"),
        # imported, the run refused every translation: its decoder checks the ids against the vocabulary
        (dict(bad_words_ids=[[99999]]), "decode.banned_ids holds 99999, outside this model's target vocabulary"),
        # generate() refuses them as well (max_new_tokens when it loads the file): they were imported as 1 token
        (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
        (dict(max_length=1), "max_length=1 must be at least 2 (it counts the decoder start token)"),
    ],
    ids=[
        "list-beams",
        "string-length",
        "string-penalty",
        "number-bans",
        "flat-bans",
        "zero-beams",
        "string-nbest",
        "nbest-over-beams",
        "greedy-nbest",
        "ban-outside",
        "no-new-tokens",
        "start-token-only",
    ],
)
def test_settings_of_the_wrong_type_are_refused_naming_the_file(tmp_path, capsys, changes, named):
    """A setting of the wrong type was a TypeError traceback (or an int() message naming no file)."""
    _import_is_refused(tmp_path, capsys, changes, named)


def _import_is_refused(tmp_path, capsys, changes: dict, named: str) -> None:
    """import-hf of a directory whose generation_config.json holds `changes` fails in one line that names
    the file and then `named`, and writes no run."""
    from tformer.cli.main import main

    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    rewrite(hf_dir / "generation_config.json", **changes)
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {hf_dir / 'generation_config.json'}: {named}") and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (dict(do_sample=True, num_beams=1), dict(temperature=1.0, top_k=50, top_p=1.0)),  # generate()'s defaults
        (
            dict(do_sample=True, num_beams=1, temperature=0.7, top_k=0, top_p=0.9),
            dict(temperature=0.7, top_k=0, top_p=0.9),
        ),
        (
            dict(do_sample=True, num_beams=1, typical_p=1.0, epsilon_cutoff=0.0),
            dict(temperature=1.0, top_k=50, top_p=1.0),
        ),
    ],
    ids=["defaults", "given", "neutral-extras"],
)
def test_a_sampling_model_imports_as_tformers_sampling_with_its_settings(tmp_path, changes, expected):
    """do_sample was refused as a setting "tformer has no such ...", though tformer samples the same way."""
    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    rewrite(hf_dir / "generation_config.json", **changes)
    import_hf(hf_dir, tmp_path / "run")
    decode = load_run(tmp_path / "run").experiment.decode
    assert decode.sampling and decode.beam_size == 1
    assert dict(temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p) == expected


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 50, 1.0), (0.6, 7, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.5)]
)
def test_tformers_sampling_distribution_is_generates(temperature, top_k, top_p):
    """The distribution tformer draws from is the one generate()'s warpers leave (temperature, then top-k,
    then top-p, in that order), in float64: what makes an imported do_sample the same decoder."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from tformer.config import DecodeConfig
    from tformer.decoding.sampling import Sampler

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    config = DecodeConfig(sampling=True, temperature=temperature, top_k=top_k, top_p=top_p)
    ours = Sampler(config, torch.arange(6)).shaped_log_probs(logits).exp()
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    torch.testing.assert_close(ours, theirs.softmax(dim=-1), atol=1e-12, rtol=0)
    if top_k or top_p < 1.0:
        assert (ours == 0).any()  # the truncation did cut tokens


def test_a_sampling_run_exports_and_imports_back_with_its_settings(tmp_path):
    from tformer.interop.hf_export import export_hf

    hf_dir = write_marian_dir(tmp_path / "hf", weights="safetensors")
    rewrite(hf_dir / "generation_config.json", do_sample=True, num_beams=1, temperature=0.8, top_k=12, top_p=0.95)
    import_hf(hf_dir, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "again", which="last")
    import_hf(tmp_path / "again", tmp_path / "run2")
    first, second = (load_run(tmp_path / name).experiment.decode for name in ("run", "run2"))
    assert second.sampling and (second.temperature, second.top_k, second.top_p) == (0.8, 12, 0.95)
    assert (first.temperature, first.top_k, first.top_p) == (second.temperature, second.top_k, second.top_p)
