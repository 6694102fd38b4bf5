"""`tformer export`: a Hugging Face MarianMT directory whose tokenizer and `generate()` agree with tformer
token for token (greedy and beam), and a CTranslate2 model whose greedy output agrees too."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import perturbed
from safetensors.torch import load_file, save_file

from tformer.cli.main import main
from tformer.config import DecodeConfig, ExperimentConfig, preset
from tformer.data.tokenizer import Tokenizer
from tformer.decoding import generate
from tformer.interop.hf_export import export_ctranslate2, export_hf, generation_config
from tformer.interop.marian import SpecialIds
from tformer.model import Transformer
from tformer.training.checkpoint import step_name
from tformer.training.checkpoint_load import LoadedRun, load_run
from tformer.training.checkpoint_save import save_checkpoint, write_pointer

transformers = pytest.importorskip("transformers")

SOURCES = [
    "the cat sat on the mat", "a dog runs in the park", "hello world how are you", "one two three four five",
    "the quick brown fox jumps over the lazy dog", "we translate sentences with a small model",
]  # fmt: skip
TARGETS = [
    "die katze sass auf der matte", "ein hund rennt im park", "hallo welt wie geht es dir", "eins zwei drei vier",
    "der schnelle braune fuchs springt", "wir uebersetzen saetze mit einem kleinen modell",
]  # fmt: skip
SENTENCES = ["the cat runs", "hello dog", "a quick model jumps over the mat", "one", "we sat in the park today"]
MAX_NEW = 10


def make_run(
    directory: Path,
    *,
    joint: bool = True,
    decode: DecodeConfig | None = None,
    byte_fallback: bool = False,
    scale: float = 0.2,
    eos_bias: float = 2.0,
    **overrides,
) -> Path:
    """A run directory holding a random, peaked tiny model and a tokenizer trained on a few sentences
    (`scale`: how far the weights are perturbed; `eos_bias`: added to eos's final-logits bias)."""
    vocab_size = 70 + (256 if byte_fallback else 0)
    tokenizer = Tokenizer.train(SOURCES, TARGETS, vocab_size=vocab_size, joint=joint, byte_fallback=byte_fallback)
    options = dict(sinusoidal_layout="concatenated", final_logits_bias=True, max_positions=64, share_embeddings=joint)
    config = preset(
        "tiny", src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size, **options | overrides
    )
    model = perturbed(Transformer(config, seed=2), seed=2, scale=scale).eval()
    if model.final_logits_bias is not None:
        with torch.no_grad():
            model.final_logits_bias[tokenizer.eos_id] += eos_bias  # some outputs end before the length limit
    decode = decode or DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average")
    name = step_name(1)
    save_checkpoint(
        directory,
        name,
        experiment=ExperimentConfig(model=config, decode=decode),
        tokenizer=tokenizer,
        model=model,
        step=1,
        trainer_state=None,
    )
    write_pointer(directory, "latest", name)
    return directory


def tformer_outputs(loaded: LoadedRun, config: DecodeConfig) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    outputs = []
    for sentence in SENTENCES:  # one at a time: no padding on either side
        src = torch.tensor([[*tokenizer.encode_source(sentence), tokenizer.eos_id]])
        (nbest,) = generate(
            loaded.model, src, src_pad_mask=None, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, config=config
        )
        outputs.append(nbest[0].tokens)
    return outputs


def hf_outputs(model, tokenizer, *, beams: int, alpha: float = 1.0, ngram: int = 0) -> list[list[int]]:
    outputs = []
    for sentence in SENTENCES:
        inputs = tokenizer([sentence], return_tensors="pt")
        with torch.no_grad():
            sequence = model.generate(
                **inputs, num_beams=beams, do_sample=False, max_new_tokens=MAX_NEW, length_penalty=alpha,
                early_stopping=False, no_repeat_ngram_size=ngram,
            )[0].tolist()  # fmt: skip
        tokens = sequence[1:]  # without the decoder start token, and from eos on
        eos = model.config.eos_token_id
        outputs.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return outputs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sinusoidal_layout": "interleaved", "activation": "swish"},
        {"joint": False},
        {"tie_output": False},
        {"tie_output": False, "joint": False, "sinusoidal_layout": "interleaved"},
        {"final_logits_bias": False, "scale_embeddings": False, "n_decoder_layers": 1, "activation": "gelu"},
    ],
    ids=str,
)
def test_hf_export_loads_tokenizes_and_generates_like_tformer(tmp_path, overrides):
    run = make_run(tmp_path / "run", **overrides)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf_dir = tmp_path / "hf"
    expected = {"config.json", "model.safetensors", "generation_config.json", "source.spm", "target.spm"}
    assert expected | {"vocab.json", "tokenizer_config.json"} <= {path.name for path in hf_dir.iterdir()}
    # the weights are as readable as every other file (safetensors alone would leave them 0600)
    assert (hf_dir / "model.safetensors").stat().st_mode & 0o777 == (hf_dir / "config.json").stat().st_mode & 0o777
    loaded = load_run(run)
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(hf_dir)
    for sentence in SENTENCES:
        ids = loaded.tokenizer.encode_source(sentence)
        assert hf_tokenizer(sentence).input_ids == [*ids, loaded.tokenizer.eos_id]
    hf_model = transformers.MarianMTModel.from_pretrained(hf_dir).eval()
    greedy = tformer_outputs(loaded, DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW))
    assert greedy == hf_outputs(hf_model, hf_tokenizer, beams=1)
    if not overrides:
        assert {len(tokens) < MAX_NEW for tokens in greedy} == {True, False}, "cover outputs ending with eos, and cut"
    for ngram in (0, 2):  # the n-gram ban makes the outputs of these random models varied
        beam = DecodeConfig(
            beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average", length_penalty=0.6,
            no_repeat_ngram_size=ngram,
        )  # fmt: skip
        assert tformer_outputs(loaded, beam) == hf_outputs(hf_model, hf_tokenizer, beams=3, alpha=0.6, ngram=ngram)
    texts = hf_tokenizer.batch_decode(greedy, skip_special_tokens=True)
    unk = loaded.tokenizer.unk_id
    for tokens, text in zip(greedy, texts, strict=True):
        if unk not in tokens:  # HF drops <unk> when skipping special tokens; tformer keeps it as ⁇
            assert text == loaded.tokenizer.decode_target(tokens)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == loaded.tokenizer.bos_id and generation["num_beams"] == 3


@pytest.mark.parametrize(
    ("tie_output", "share_embeddings"), [(True, True), (False, True), (True, False), (False, False)]
)
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_export_then_import_round_trip_gives_the_same_logits(tmp_path, tie_output, share_embeddings, layout):
    """tformer -> HF directory -> tformer: bit for bit with Marian's own position layout. Shared embeddings
    with an untied output projection come back as separate (equal) ones: Hugging Face ties no embedding
    when tie_word_embeddings is false. The interleaved layout comes back permuted (concatenated), which
    reorders the sums over the model dimension: equal to float rounding."""
    options = dict(tie_output=tie_output, share_embeddings=share_embeddings, sinusoidal_layout=layout)
    run = make_run(tmp_path / "run", **options)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    original, back = load_run(run), load_run(tmp_path / "back")
    config = back.model.config
    assert (config.tie_output, config.share_embeddings) == (tie_output, share_embeddings and tie_output)
    assert back.experiment.decode == original.experiment.decode
    for sentence in SENTENCES:
        assert back.tokenizer.encode_source(sentence) == original.tokenizer.encode_source(sentence)
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, config.src_vocab_size, (3, 9), generator=generator)
    tgt = torch.randint(4, config.tgt_vocab_size, (3, 7), generator=generator)
    tgt[:, 0] = original.tokenizer.bos_id
    with torch.no_grad():
        expected, actual = original.model(src, tgt), back.model(src, tgt)
    if layout == "concatenated":
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_an_untied_output_with_one_embedding_saved_once_as_transformers_4_saves_it_is_imported(tmp_path):
    """One vocabulary and an untied output: transformers 4 made the encoder's and the decoder's embedding the
    one `model.shared` module and saved it once, as model.shared.weight. The import stopped with 'the weights
    lack model.decoder.embed_tokens.weight'; the decoder's embedding is now the shared one, as it was there."""
    run = make_run(tmp_path / "run", tie_output=False, share_embeddings=True)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    assert torch.equal(state.pop("model.encoder.embed_tokens.weight"), state["model.shared.weight"])
    assert torch.equal(state.pop("model.decoder.embed_tokens.weight"), state["model.shared.weight"])
    save_file(state, weights, metadata={"format": "pt"})
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    original, back = load_run(run), load_run(tmp_path / "back")
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, back.model.config.src_vocab_size, (3, 9), generator=generator)
    tgt = torch.randint(4, back.model.config.tgt_vocab_size, (3, 7), generator=generator)
    with torch.no_grad():
        assert torch.equal(back.model(src, tgt), original.model(src, tgt))


# one vocabulary with separate source and target embeddings (share_embeddings=false) converts too
@pytest.mark.parametrize(
    ("tie_output", "share_embeddings"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_ctranslate2_export_matches_greedy_and_beam_decoding(tmp_path, tie_output, share_embeddings):
    ctranslate2 = pytest.importorskip("ctranslate2")
    overrides = dict(sinusoidal_layout="interleaved", tie_output=tie_output, share_embeddings=share_embeddings)
    run = make_run(tmp_path / "run", **overrides)
    assert main(["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    loaded = load_run(run)
    tokenizer = loaded.tokenizer
    sources = [[*tokenizer.source_pieces(s), tokenizer.id_to_source_piece([tokenizer.eos_id])[0]] for s in SENTENCES]
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=MAX_NEW, min_decoding_length=0)
    expected = tformer_outputs(loaded, DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW))
    assert [r.hypotheses[0] for r in results] == [tokenizer.id_to_target_piece(tokens) for tokens in expected]
    # docs/interop.md's two beam settings with the same best hypothesis, at 4 beams
    for alpha, normalization, early_stopping in ((0.6, "average", True), (0.0, "none", False)):
        results = translator.translate_batch(
            sources, beam_size=4, length_penalty=alpha, max_decoding_length=MAX_NEW, min_decoding_length=0,
            return_scores=True,
        )  # fmt: skip
        config = DecodeConfig(
            beam_size=4, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization=normalization, length_penalty=alpha,
            early_stopping=early_stopping,
        )  # fmt: skip
        best = [tformer_best(loaded, sentence, config) for sentence in SENTENCES]
        assert [r.hypotheses[0] for r in results] == [tokenizer.id_to_target_piece(h.tokens) for h in best]
        assert [r.scores[0] for r in results] == pytest.approx([h.score for h in best], abs=1e-4)


def tformer_best(loaded: LoadedRun, sentence: str, config: DecodeConfig):
    """tformer's best hypothesis for one sentence."""
    tokenizer = loaded.tokenizer
    src = torch.tensor([[*tokenizer.encode_source(sentence), tokenizer.eos_id]])
    (nbest,) = generate(
        loaded.model, src, src_pad_mask=None, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, config=config
    )
    return nbest[0]


def test_ctranslate2_beam_search_with_a_length_penalty_is_tformers_with_early_stopping(tmp_path):
    """translate_batch(length_penalty=alpha) is tformer's "average" normalisation (eos counted in the
    length) with early_stopping = true: the same n-best lists with the same scores. Its beam search has no
    counterpart of early_stopping = false with a penalty, which the export names in its warning."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    decode = DecodeConfig(
        beam_size=3, nbest=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average", length_penalty=0.6,
        early_stopping=True,
    )  # fmt: skip
    run = make_run(tmp_path / "run", decode=decode, scale=0.5, eos_bias=8.0)  # outputs of varied lengths
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_ctranslate2(run, tmp_path / "ct2")
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    loaded = load_run(run)
    tokenizer = loaded.tokenizer
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 10, (12,), generator=generator).tolist()
    sources = [[*torch.randint(4, tokenizer.src_vocab_size, (n,), generator=generator).tolist(), 2] for n in lengths]
    results = translator.translate_batch(
        [tokenizer.id_to_source_piece(ids) for ids in sources], beam_size=3, num_hypotheses=3, length_penalty=0.6,
        max_decoding_length=MAX_NEW, min_decoding_length=0, return_scores=True,
    )  # fmt: skip
    outputs = {}
    for early_stopping in (True, False):
        config = dataclasses.replace(decode, early_stopping=early_stopping)
        outputs[early_stopping] = [
            generate(loaded.model, torch.tensor([ids]), src_pad_mask=None, bos_id=1, eos_id=2, config=config)[0]
            for ids in sources
        ]
    lengths = set()
    for nbest, result in zip(outputs[True], results, strict=True):
        assert [tokenizer.id_to_target_piece(h.tokens) for h in nbest] == result.hypotheses
        assert [h.score for h in nbest] == pytest.approx(result.scores, abs=1e-4)
        lengths |= {len(h.tokens) for h in nbest}
    assert {0, MAX_NEW} < lengths, "cover hypotheses ending with eos (some of several tokens) and cut ones"
    assert [[h.tokens for h in nbest] for nbest in outputs[False]] != [
        [h.tokens for h in nbest] for nbest in outputs[True]
    ]
    with pytest.warns(UserWarning, match="early_stopping=false with a length penalty"):
        export_ctranslate2(
            make_run(tmp_path / "late", decode=dataclasses.replace(decode, early_stopping=False)), tmp_path / "late-ct2"
        )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"length_normalization": "gnmt"}, "length_normalization='gnmt': its length_penalty is tformer's 'average'"),
        (
            {"length_normalization": "none", "early_stopping": False},
            "no length penalty with early_stopping=true or nbest > 1",
        ),
        ({"no_repeat_ngram_size": 2, "min_len": 2}, "min_len, no_repeat_ngram_size in beam search: it renormalises"),
        (
            {"beam_size": 1, "nbest": 1, "max_len_a": 1.2},
            "max_len_a=1.2: its max_decoding_length does not grow with the source",
        ),
        ({"forced_eos": True}, "forced_eos: it forces no eos at max_decoding_length"),
        (
            {"sampling": True, "top_k": 5, "temperature": 0.7},
            "sampling: it draws other samples than tformer's, and only when asked (sampling_topk=5, sampling_topp=1.0, "
            "sampling_temperature=0.7; its default is greedy search)",
        ),
    ],
)
def test_ctranslate2_export_warns_in_one_line_about_settings_it_cannot_reproduce(tmp_path, changes, reason):
    import subprocess
    import sys

    decode = DecodeConfig(
        beam_size=3, nbest=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average", early_stopping=True
    )
    run = make_run(tmp_path / "run", decode=dataclasses.replace(decode, **changes))
    command = [sys.executable, "-m", "tformer.cli.main", "export", str(run), "--to", "ctranslate2"]
    done = subprocess.run([*command, "--out", str(tmp_path / "ct2")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith("warning: CTranslate2's translate_batch cannot reproduce")
    assert reason in warned[0] and "Hugging Face" not in warned[0]
    greedy = dataclasses.replace(
        decode, beam_size=1, nbest=1, min_len=2, no_repeat_ngram_size=2
    )  # greedy picks the same tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_ctranslate2(make_run(tmp_path / "greedy", decode=greedy), tmp_path / "greedy-ct2")


def test_ctranslate2_has_no_forced_eos_which_the_export_names_and_greedy_search_stops_a_token_sooner(tmp_path):
    """tformer's forced_eos ends a cut sentence with eos in its last place; translate_batch cuts it at
    max_decoding_length without eos, one token longer. Greedy search gives tformer's tokens with
    max_decoding_length = max_len_b - 1, as the export's warning says."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    decode = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW, forced_eos=True)
    run = make_run(tmp_path / "run", decode=decode, eos_bias=-5.0)  # every output reaches the limit
    with pytest.warns(UserWarning, match="forced_eos: it forces no eos") as warned:
        export_ctranslate2(run, tmp_path / "ct2")
    assert len([w for w in warned if "CTranslate2" in str(w.message)]) == 1
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    loaded = load_run(run)
    tokenizer = loaded.tokenizer
    sources = [[*tokenizer.source_pieces(s), tokenizer.id_to_source_piece([tokenizer.eos_id])[0]] for s in SENTENCES]
    expected = [tokenizer.id_to_target_piece(tokens) for tokens in tformer_outputs(loaded, decode)]
    assert {len(pieces) for pieces in expected} == {MAX_NEW - 1}
    for limit, same in ((MAX_NEW, False), (MAX_NEW - 1, True)):
        results = translator.translate_batch(sources, beam_size=1, max_decoding_length=limit, min_decoding_length=0)
        assert ([r.hypotheses[0] for r in results] == expected) is same


FILE_SIZE_LIMIT = """
import resource, signal, sys
from tformer.cli.main import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_while_writing_the_ctranslate2_model_names_the_file(tmp_path):
    """CTranslate2 writes model.bin with plain writes, whose error names no file: an export on a full disk
    said only "error: [Errno 27] File too large". Simulated with a file-size limit that model.bin exceeds and
    every file of the Hugging Face directory converted fits in."""
    import subprocess
    import sys

    pytest.importorskip("ctranslate2")
    run = make_run(tmp_path / "run")
    export_hf(run, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_ctranslate2(run, tmp_path / "ct2")
    model_bin = (tmp_path / "ct2" / "model.bin").stat().st_size
    largest = max(path.stat().st_size for path in (tmp_path / "hf").iterdir())
    assert largest < model_bin
    command = ["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "full")]
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str((largest + model_bin) // 2), *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert done.returncode == 2 and errors == [f"error: [Errno 27] File too large: '{tmp_path / 'full' / 'model.bin'}'"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ct2", "hf", "run"]  # nothing half-written left


def test_byte_pieces_survive_export_to_hf_and_ctranslate2_and_import_back(tmp_path):
    """A data.byte_fallback tokenizer: MarianTokenizer reads its byte pieces from the same spm files and
    vocab.json, so unseen characters get tformer's ids and decode back; import-hf keeps them too."""
    run = make_run(tmp_path / "run", byte_fallback=True, sinusoidal_layout="interleaved")
    loaded = load_run(run)
    tokenizer = loaded.tokenizer
    text = "the cat 😀 猫"  # neither character is in the training sentences
    ids = tokenizer.encode_source(text)
    assert tokenizer.id_to_source_piece(ids)[-3:] == ["<0xE7>", "<0x8C>", "<0xAB>"]
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(text).input_ids == [*ids, tokenizer.eos_id]
    assert hf_tokenizer.decode([*ids, tokenizer.eos_id], skip_special_tokens=True) == text
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    imported = load_run(tmp_path / "imported").tokenizer
    assert imported.encode_source(text) == ids and imported.decode_target(ids) == text
    ctranslate2 = pytest.importorskip("ctranslate2")
    assert main(["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    source = [*tokenizer.source_pieces(text), tokenizer.id_to_source_piece([tokenizer.eos_id])[0]]
    (result,) = translator.translate_batch([source], beam_size=1, max_decoding_length=MAX_NEW, min_decoding_length=0)
    src = torch.tensor([[*ids, tokenizer.eos_id]])
    config = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW)
    (nbest,) = generate(
        loaded.model, src, src_pad_mask=None, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, config=config
    )
    assert result.hypotheses[0] == tokenizer.id_to_target_piece(nbest[0].tokens)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm_position": "pre"}, "norm_position must be post"),
        ({"positional_encoding": "learned"}, "positional_encoding must be sinusoidal"),
        ({"layer_norm_eps": 1e-6}, "layer_norm_eps must be 1e-05 (got 1e-06)"),
    ],
)
def test_what_marian_cannot_express_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    run = make_run(tmp_path / "run", **overrides)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot express this model as Hugging Face Marian") and message in error
    assert error.count("\n") == 1 and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("to", ["hf", "ctranslate2"])
def test_a_banned_id_outside_the_vocabulary_is_refused_in_one_line_writing_nothing(tmp_path, capsys, to):
    """tformer refuses to translate with such a ban, and generate() refuses the bad_words_ids entry it
    became; the export said nothing and wrote a directory that could not generate."""
    decode = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW, banned_ids=(5, 9999))
    run = make_run(tmp_path / "run", decode=decode)
    assert main(["export", str(run), "--to", to, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot export: decode.banned_ids holds 9999, outside this model's target")
    assert error.count("\n") == 1 and not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_and_ctranslate2_refuses_separate_vocabularies(tmp_path, capsys):
    run = make_run(tmp_path / "run", joint=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 2
    assert "one vocabulary shared" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["current directory", "symbolic link"])
def test_an_empty_out_given_as_the_current_directory_or_a_link_is_written_in_place(tmp_path, monkeypatch, given):
    """An existing empty --out is accepted; given as "." or as a link to a directory it was removed and
    replaced by a rename, which fails there with an errno line ("Invalid argument: '.'", "Not a directory")."""
    run = make_run(tmp_path / "run")
    for command, source, to in (("export", run, "hf"), ("import-hf", tmp_path / "first" / "hf", None)):
        target = tmp_path / f"{command}-target"
        target.mkdir()
        if given == "current directory":
            monkeypatch.chdir(target)
            out = Path(".")
        else:
            out = tmp_path / f"{command}-link"
            out.symlink_to(target)
        if command == "import-hf":
            assert main(["export", str(run), "--to", "hf", "--out", str(source)]) == 0
        assert main([command, str(source.resolve()), *(["--to", to] if to else []), "--out", str(out)]) == 0
        assert out.resolve() == target.resolve() and out.is_symlink() == (given == "symbolic link")
        if command == "export":
            ids = transformers.MarianTokenizer.from_pretrained(target)(SENTENCES[0]).input_ids[:-1]
        else:
            assert sorted(path.name for path in target.iterdir()) == ["checkpoints", "latest"]
            ids = load_run(target).tokenizer.encode_source(SENTENCES[0])
        assert ids == load_run(run).tokenizer.encode_source(SENTENCES[0])


@pytest.mark.parametrize("command", ["export", "import-hf"])
def test_an_out_that_is_a_dangling_symbolic_link_is_refused_in_one_line_first(tmp_path, capsys, command):
    """A link to nothing cannot become the directory: the conversion ran whole and then failed to rename
    its staging directory onto the link ('[Errno 20] Not a directory: ...')."""
    run = make_run(tmp_path / "run")
    source = run if command == "export" else tmp_path / "hf"
    if command == "import-hf":
        export_hf(run, source)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    arguments = [command, str(source), "--out", str(tmp_path / "link")] + (
        ["--to", "hf"] if command == "export" else []
    )
    assert main(arguments) == 2
    error = capsys.readouterr().err
    link, target = tmp_path / "link", tmp_path / "nowhere"
    assert error == f"error: --out {link} is a symbolic link to {target}, which does not exist; give a directory\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted({"run", "link", source.name})


def test_an_out_inside_the_input_is_refused_in_one_line_leaving_the_input_as_it_was(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    commands = [
        ("export", run, "run", "hf"),
        ("export", run, "run", "ctranslate2"),
        ("import-hf", tmp_path / "hf", "Hugging Face", None),
    ]
    for command, source, name, to in commands:
        before = sorted(path.relative_to(source) for path in source.rglob("*"))
        for out in (source / "out", source / "checkpoints" / "out", source):
            capsys.readouterr()
            assert main([command, str(source), *(["--to", to] if to else []), "--out", str(out)]) == 2
            expected = f"error: --out {out} is inside the {name} directory {source}; choose a directory outside it\n"
            assert capsys.readouterr().err == expected
        assert sorted(path.relative_to(source) for path in source.rglob("*")) == before


def configured_outputs(model, tokenizer, **options) -> list[list[int]]:
    """generate() with the exported generation_config's settings (only the length limit is given, unless
    `max_new_tokens=None`: then that of generation_config.json too)."""
    options = {"max_new_tokens": MAX_NEW} | options
    if options["max_new_tokens"] is None:
        del options["max_new_tokens"]
    outputs = []
    for sentence in SENTENCES:
        with torch.no_grad():
            sequence = model.generate(**tokenizer([sentence], return_tensors="pt"), **options)
        tokens = sequence[0].tolist()[1:]
        eos = model.config.eos_token_id
        outputs.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return outputs


def test_exported_generation_config_bans_tokens_and_keeps_the_minimum_length(tmp_path):
    plain = DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average")
    unconstrained = tformer_outputs(
        load_run(make_run(tmp_path / "plain", decode=plain)), dataclasses.replace(plain, beam_size=1)
    )
    banned = Counter(token for tokens in unconstrained for token in tokens).most_common(1)[0][0]
    decode = dataclasses.replace(plain, banned_ids=(banned,), min_len=min(len(tokens) for tokens in unconstrained) + 2)
    run = make_run(tmp_path / "run", decode=decode)
    export_hf(run, tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["bad_words_ids"] == [[banned]] and generation["min_length"] == decode.min_len + 1
    loaded = load_run(run)
    hf_model = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    greedy = tformer_outputs(loaded, dataclasses.replace(decode, beam_size=1))
    assert greedy != unconstrained
    assert greedy == configured_outputs(hf_model, hf_tokenizer, num_beams=1)
    assert tformer_outputs(loaded, decode) == configured_outputs(hf_model, hf_tokenizer)


def test_no_length_normalisation_is_hf_length_penalty_zero(tmp_path):
    decode = DecodeConfig(
        beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="none", no_repeat_ngram_size=2
    )
    run = make_run(tmp_path / "run", decode=decode)
    export_hf(run, tmp_path / "hf")
    loaded = load_run(run)
    beam = tformer_outputs(loaded, decode)
    average = dataclasses.replace(decode, length_normalization="average", length_penalty=1.0)
    assert beam != tformer_outputs(loaded, average), "the normalisation must matter for these sentences"
    hf_model = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    assert beam == configured_outputs(hf_model, hf_tokenizer)


@pytest.mark.parametrize("max_len_b", [0, MAX_NEW, 64, 200], ids=["zero", "below", "at", "above"])
def test_generate_without_a_length_argument_stops_where_tformer_stops(tmp_path, max_len_b):
    """generation_config.json's max_length is tformer's limit, clamped as tformer clamps it: 1 to
    max_positions (64) predicted tokens after the decoder start token (max_length = 1, for max_len_b = 0,
    made generate() refuse to run)."""
    decode = DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=max_len_b, length_normalization="average")
    run = make_run(tmp_path / "run", decode=decode)
    export_hf(run, tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    limit = max(1, min(max_len_b, 64))
    assert generation["max_length"] == limit + 1
    loaded = load_run(run)
    hf_model = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    greedy = tformer_outputs(loaded, dataclasses.replace(decode, beam_size=1))
    assert max(len(tokens) for tokens in greedy) == limit, "some output must reach the limit"
    assert greedy == configured_outputs(hf_model, hf_tokenizer, num_beams=1, max_new_tokens=None)
    assert tformer_outputs(loaded, decode) == configured_outputs(hf_model, hf_tokenizer, max_new_tokens=None)


def test_gnmt_or_coverage_penalised_beam_search_is_exported_with_a_warning(tmp_path):
    gnmt = DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="gnmt")
    with pytest.warns(UserWarning, match="no GNMT length penalty.*beam outputs will differ"):
        export_hf(make_run(tmp_path / "run", decode=gnmt), tmp_path / "hf")
    coverage = dataclasses.replace(gnmt, length_normalization="average", coverage_penalty=0.2)
    with pytest.warns(UserWarning, match="no coverage penalty.*coverage_penalty=0.2.*beam outputs will differ"):
        export_hf(make_run(tmp_path / "coverage", decode=coverage), tmp_path / "hf-coverage")
    greedy = dataclasses.replace(gnmt, beam_size=1, coverage_penalty=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_hf(make_run(tmp_path / "greedy", decode=greedy), tmp_path / "hf-greedy")


def test_gnmt_without_a_length_penalty_is_exported_silently_and_decodes_like_tformer(tmp_path):
    """GNMT's lp(n) = ((5 + n) / 6) ** 0 is 1: HF's length_penalty 0 gives the same scores, so the export
    must not warn that beam outputs will differ (it did); generate() with the file's settings agrees."""
    decode = DecodeConfig(
        beam_size=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="gnmt", length_penalty=0.0,
        no_repeat_ngram_size=2,
    )  # fmt: skip
    run = make_run(tmp_path / "run", decode=decode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_hf(run, tmp_path / "hf")
    loaded = load_run(run)
    hf_model = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    assert tformer_outputs(loaded, decode) == configured_outputs(hf_model, hf_tokenizer)


def test_a_ban_of_eos_is_left_out_with_a_warning():
    """generate() drops an [eos] entry of bad_words_ids, so the export leaves it out and says so."""
    ids = SpecialIds(bos_id=1, eos_id=2, pad_id=0)
    decode = DecodeConfig(beam_size=1, banned_ids=(2, 5))
    with pytest.warns(UserWarning, match="never bans eos"):
        assert generation_config(decode, ids, max_positions=64).bad_words_ids == [[5]]
    only_eos = DecodeConfig(beam_size=1, banned_ids=(2,))
    with pytest.warns(UserWarning, match="never bans eos"):
        assert generation_config(only_eos, ids, max_positions=64).bad_words_ids is None


def test_forced_eos_is_exported_as_hf_forced_eos_token_id():
    ids = SpecialIds(bos_id=1, eos_id=2, pad_id=0)
    forced = DecodeConfig(beam_size=3, length_normalization="average", forced_eos=True)
    assert generation_config(forced, ids, max_positions=64).forced_eos_token_id == 2
    assert generation_config(DecodeConfig(beam_size=1), ids, max_positions=64).forced_eos_token_id is None


def test_a_limit_that_grows_with_the_source_is_exported_with_a_one_line_warning(tmp_path):
    import subprocess
    import sys

    growing = DecodeConfig(beam_size=1, max_len_a=1.2, max_len_b=10)
    run = make_run(tmp_path / "run", decode=growing)
    command = [sys.executable, "-m", "tformer.cli.main", "export", str(run), "--to", "hf"]
    command += ["--out", str(tmp_path / "hf")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    # the command line prints a warning as one line, like an error: no file name, no source line
    warned = [line for line in done.stderr.splitlines() if "length limit" in line or "export(" in line]
    assert warned == [
        "warning: Hugging Face has no length limit that grows with the source: generate() stops after 64 "
        "tokens (max_length=65), not at tformer's 1.2 x source length + 10; outputs that reach tformer's limit "
        "differ unless you pass generate() that max_new_tokens"
    ]
    fixed = dataclasses.replace(growing, max_len_a=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_hf(make_run(tmp_path / "fixed", decode=fixed), tmp_path / "hf-fixed")


def test_an_imported_opus_model_converts_to_a_ctranslate2_model_that_translates_like_it(tmp_path):
    """OPUS-MT starts decoding from pad and has no bos token of its own: the conversion names the start
    token as CTranslate2's bos (a null one made the model unloadable)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from test_import_hf import SENTENCES as OPUS_SENTENCES
    from test_import_hf import write_marian_dir

    from tformer.decoding.pipeline import Translator

    hf_dir = write_marian_dir(tmp_path / "opus", weights="safetensors")
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    loaded = load_run(tmp_path / "run")
    tokenizer = loaded.tokenizer
    greedy = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW, banned_ids=(tokenizer.pad_id,))
    expected = [t[0].tokens for t in Translator(loaded.model, tokenizer, greedy).translate(OPUS_SENTENCES)]
    eos = tokenizer.id_to_source_piece([tokenizer.eos_id])[0]
    sources = [[*tokenizer.source_pieces(sentence), eos] for sentence in OPUS_SENTENCES]
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=MAX_NEW, min_decoding_length=0)
    assert [r.hypotheses[0] for r in results] == [tokenizer.id_to_target_piece(tokens) for tokens in expected]


def test_a_sampling_run_is_exported_as_hf_sampling_from_the_same_distribution(tmp_path):
    """generate()'s warpers built from the exported settings shape the logits as tformer's sampler does."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from tformer.decoding.sampling import Sampler

    decode = DecodeConfig(beam_size=2, sampling=True, temperature=0.7, top_k=6, top_p=0.8, max_len_a=0.0)
    export_hf(make_run(tmp_path / "run", decode=decode), tmp_path / "hf")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.do_sample and generation.num_beams == 1
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    warped = logits
    for warper in (
        TemperatureLogitsWarper(generation.temperature),
        TopKLogitsWarper(generation.top_k),
        TopPLogitsWarper(generation.top_p),
    ):
        warped = warper(None, warped)
    expected = warped.log_softmax(dim=-1)
    actual = Sampler(decode, torch.arange(5)).shaped_log_probs(logits)
    assert torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_nbest_is_exported_as_num_return_sequences_and_imported_back(tmp_path):
    """generation_config.json held no n-best setting: generate() returned one sequence where tformer gives
    nbest, and an import read nbest = 1 back. Now generate() returns tformer's n-best lists, token for token."""
    from tformer.interop.hf_import import import_hf

    decode = DecodeConfig(beam_size=4, nbest=3, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average")
    run = make_run(tmp_path / "run", decode=decode)
    export_hf(run, tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["num_return_sequences"]) == (4, 3)
    loaded = load_run(run)
    hf_model = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    eos = loaded.tokenizer.eos_id
    for sentence in SENTENCES:
        src = torch.tensor([[*loaded.tokenizer.encode_source(sentence), eos]])
        (ours,) = generate(
            loaded.model, src, src_pad_mask=None, bos_id=loaded.tokenizer.bos_id, eos_id=eos, config=decode
        )
        with torch.no_grad():
            sequences = hf_model.generate(**hf_tokenizer([sentence], return_tensors="pt")).tolist()
        theirs = [tokens[1 : tokens.index(eos, 1) if eos in tokens[1:] else None] for tokens in sequences]
        assert [hypothesis.tokens for hypothesis in ours] == theirs
    import_hf(tmp_path / "hf", tmp_path / "again")
    assert load_run(tmp_path / "again").experiment.decode.nbest == 3
    samples = DecodeConfig(beam_size=1, sampling=True, nbest=5, max_len_a=0.0)  # n samples, one beam
    export_hf(make_run(tmp_path / "sampling", decode=samples), tmp_path / "hf-sampling")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf-sampling")
    assert (generation.do_sample, generation.num_beams, generation.num_return_sequences) == (True, 1, 5)
    import_hf(tmp_path / "hf-sampling", tmp_path / "again-sampling")
    assert load_run(tmp_path / "again-sampling").experiment.decode.nbest == 5


def test_exports_print_their_own_lines_without_transformers_progress_bars(tmp_path, capsys):
    """transformers drew "Writing model shards" and "Loading weights" bars between the export's lines."""
    from transformers.utils import logging as transformers_logging

    run = make_run(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    targets = ["hf"]
    if importlib.util.find_spec("ctranslate2") is not None:
        assert main(["export", str(run), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
        targets.append("ct2")
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "Writing model shards" not in captured.err, captured.err
    assert captured.out.splitlines() == [f"wrote {tmp_path / name}" for name in targets]
    assert transformers_logging.is_progress_bar_enabled()  # put back as it was


def test_the_ctranslate2_export_makes_its_hf_copy_beside_out_not_in_the_system_temporary_directory(
    tmp_path, monkeypatch
):
    """The intermediate Hugging Face copy went into the system's temporary directory: a full (or missing)
    /tmp failed the export however much room --out's disk had."""
    pytest.importorskip("ctranslate2")
    import tempfile

    run = make_run(tmp_path / "run")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # any use of /tmp fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_ctranslate2(run, tmp_path / "out" / "ct2")
    assert (tmp_path / "out" / "ct2" / "model.bin").is_file()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["ct2"]  # the scratch copy is gone


def test_a_killed_ctranslate2_exports_scratch_directory_is_removed_by_the_next_export(tmp_path):
    from tformer.interop.directories import fresh_directory

    dead = 2**22 + 1  # above the kernel's pid_max: no such process
    (tmp_path / "out").mkdir()
    for left in (tmp_path / f".tmp-out-scratch-{dead}", tmp_path / "out" / f".tmp-scratch-{dead}"):
        left.mkdir()
    assert fresh_directory(tmp_path / "out") == tmp_path / "out"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert list((tmp_path / "out").iterdir()) == []
