"""Export a tformer run as a Hugging Face MarianMT directory, or as a CTranslate2 model made from one.

The Hugging Face directory holds config.json, model.safetensors, generation_config.json and Marian's
tokenizer files (source.spm, target.spm, vocab.json, tokenizer_config.json; target_vocab.json for
separate vocabularies). The sentencepiece models are tformer's own and every piece keeps its id, so
`MarianTokenizer` produces tformer's ids, with one difference: tformer's Python `normalize()` (NFKC,
U+2581 read as a space, whitespace runs made one space) is not part of the files, so the two agree on text
passed through it (not on NFKC text alone: sentencepiece collapses spaces, but keeps tabs and newlines).

CTranslate2's Marian loader assumes OPUS-MT's layout: decoding starts from a zero embedding and the
last vocabulary entry is a padding token it drops. A tformer model starts from its bos embedding and
its last entry is a real piece, so the conversion uses the loader CTranslate2 uses for BART (start
token from the config, full vocabulary) with Marian's settings (post-norm, no embedding layer norm).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tformer.config import DecodeConfig
from tformer.decoding.constraints import check_banned_ids
from tformer.interop.directories import fresh_directory, scratch_beside, written_atomically
from tformer.interop.marian import SpecialIds, check_exportable, to_marian
from tformer.interop.marian_tokenizer import SOURCE_SPM, TARGET_SPM, VocabTokenizer
from tformer.training.checkpoint_load import LoadedRun, load_run
from tformer.training.checkpoint_save import failed_write_as_os_error, give_plain_mode


def export_hf(run: str | Path, out: str | Path, *, which: str = "best") -> Path:
    """Write the run's model and tokenizer as a MarianMT directory at `out` (which must not exist or be
    empty); returns `out`. Models Marian cannot express are refused with a one-line ValueError."""
    loaded = load_run(run, which=which)
    _check_run(loaded)
    return _write_hf(loaded, fresh_directory(out))


def _check_run(loaded: LoadedRun) -> None:
    """Refuse, in one line and before anything is written, a model Marian cannot express and decode
    settings tformer itself refuses to translate with: a banned id outside the target vocabulary would
    be written as a bad_words_ids entry that generate() rejects."""
    check_exportable(loaded.model.config)
    try:
        check_banned_ids(loaded.experiment.decode, loaded.model.config.tgt_vocab_size)
    except ValueError as error:
        raise ValueError(f"cannot export: {error}") from None


def _write_hf(loaded: LoadedRun, out: Path) -> Path:
    """The MarianMT directory of an exportable run already loaded, written at `out` (fresh)."""
    tokenizer = loaded.tokenizer
    if not isinstance(tokenizer, VocabTokenizer):
        tokenizer = VocabTokenizer.from_tokenizer(tokenizer)
    ids = SpecialIds(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    hf_model = to_marian(loaded.model, ids)
    hf_model.generation_config = generation_config(loaded.experiment.decode, ids, loaded.model.config.max_positions)
    with written_atomically(out) as temporary, without_progress_bars():
        with failed_write_as_os_error(out / "model.safetensors"):
            hf_model.save_pretrained(temporary)
        give_plain_mode(Path(temporary) / "model.safetensors", like=Path(temporary) / "config.json")
        tokenizer.write_marian_files(temporary, model_max_length=loaded.model.config.max_positions)
    return out


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars ("Writing model shards", "Loading weights": a one-file model is
    written in a blink, and the bars only bury the export's own lines) while converting."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def export_ctranslate2(run: str | Path, out: str | Path, *, which: str = "best") -> Path:
    """Export the run to Hugging Face format in a directory beside `out` (on its file system: the system's
    temporary directory may be small or full), then convert that with
    `ctranslate2.converters.TransformersConverter`; the sentencepiece models are copied alongside."""
    loaded = load_run(run, which=which)
    _check_run(loaded)
    if not loaded.tokenizer.joint:
        raise ValueError("CTranslate2's Marian converter needs one vocabulary shared by source and target")
    out = fresh_directory(out)
    from ctranslate2.converters import TransformersConverter

    differences = ctranslate2_differences(loaded.experiment.decode)
    if differences:
        warnings.warn(
            f"CTranslate2's translate_batch cannot reproduce this run's decoding ({'; '.join(differences)}), so "
            "its outputs may differ from tformer's; docs/interop.md lists the settings that give the same ones",
            stacklevel=2,
        )
    with written_atomically(out) as temporary, scratch_beside(temporary) as hf_dir:
        with warnings.catch_warnings():  # they are about generate() and generation_config.json, unused here
            warnings.simplefilter("ignore")
            _write_hf(loaded, fresh_directory(Path(hf_dir) / "hf"))  # the run loaded above, not read again
        with _start_token_loader(), warnings.catch_warnings(), without_progress_bars():
            # MarianTokenizer's advice; the conversion reads only its vocabulary
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            with _failed_write_named(temporary, out):
                TransformersConverter(str(Path(hf_dir) / "hf"), copy_files=[SOURCE_SPM, TARGET_SPM]).convert(
                    str(temporary), force=True
                )
    return out


@contextlib.contextmanager
def _failed_write_named(temporary: Path, out: Path) -> Iterator[None]:
    """CTranslate2 writes its files with plain writes, whose OSError (a full disk) names no file: name the
    one it was writing, the newest in `temporary`, by its place in `out`."""
    try:
        yield
    except OSError as error:
        written = [path for path in temporary.iterdir() if path.is_file()]
        if error.filename is not None or error.errno is None or not written:
            raise
        newest = max(written, key=lambda path: path.stat().st_mtime_ns)
        raise OSError(error.errno, error.strerror, str(out / newest.name)) from None


def ctranslate2_differences(decode: DecodeConfig) -> list[str]:
    """The run's decode settings that no `translate_batch` argument reproduces, each with the reason.

    CTranslate2's `length_penalty` is tformer's "average" normalisation (the length counts eos, as here),
    but its beam search stops a sentence once `beam_size` hypotheses ended (tformer's early_stopping =
    true), or, with length_penalty 0, once the best beam ended (tformer's 1-best with early_stopping =
    false). It bans tokens (minimum length, n-gram ban, banned ids) on the logits, before the softmax, so
    the other tokens' log-probabilities are renormalised: greedy picks the same tokens, beam search may
    not. Sampling is translate_batch's only when asked, with draws of its own. It has no forced eos: a
    sentence that reaches max_decoding_length ends there without eos. A length limit is one number for
    the whole batch."""
    differences = []
    if decode.sampling:  # translate_batch's defaults (sampling_topk=1) search greedily
        differences.append(
            f"sampling: it draws other samples than tformer's, and only when asked (sampling_topk={decode.top_k}, "
            f"sampling_topp={decode.top_p}, sampling_temperature={decode.temperature}; its default is greedy search)"
        )
    if decode.beam_size > 1 and not decode.sampling:
        penalised = decode.length_normalization != "none" and decode.length_penalty != 0.0
        if decode.length_normalization == "gnmt" and penalised:
            differences.append("length_normalization='gnmt': its length_penalty is tformer's 'average'")
        if penalised and not decode.early_stopping:
            differences.append(
                "early_stopping=false with a length penalty: it stops a sentence once beam_size hypotheses "
                "ended, as early_stopping=true does"
            )
        if not penalised and (decode.early_stopping or decode.nbest > 1):
            differences.append(
                "no length penalty with early_stopping=true or nbest > 1: it stops a sentence once its best beam ended"
            )
        if decode.coverage_penalty > 0:
            differences.append(f"coverage_penalty={decode.coverage_penalty}: tformer's is not its coverage_penalty")
        banned = [
            name
            for name, value in (
                ("min_len", decode.min_len),
                ("no_repeat_ngram_size", decode.no_repeat_ngram_size),
                ("banned_ids", decode.banned_ids),
            )
            if value
        ]
        if banned:
            differences.append(
                f"{', '.join(banned)} in beam search: it renormalises the log-probabilities of the tokens it allows"
            )
    if decode.forced_eos:
        differences.append(
            "forced_eos: it forces no eos at max_decoding_length, where a sentence it cuts ends without one "
            "and one token longer (greedy search gives tformer's tokens with max_decoding_length = max_len_b - 1)"
        )
    if decode.max_len_a != 0:
        differences.append(f"max_len_a={decode.max_len_a}: its max_decoding_length does not grow with the source")
    return differences


def generation_config(decode: DecodeConfig, ids: SpecialIds, max_positions: int) -> Any:
    """The run's decode settings where Hugging Face has the same ones. HF's length penalty is tformer's
    `length_normalization="average"` (and "none" is its length_penalty 0); GNMT's penalty has no HF
    counterpart. HF's lengths count the decoder start token: max_length is max_len_b + 1 when the limit
    is fixed (max_len_a = 0; else max_positions + 1, tformer's cap; max_len_b is clamped to [1,
    max_positions] as tformer clamps it), min_length is tformer's min_len + 1.
    Banned tokens are single-token `bad_words_ids`, banned after the softmax as tformer bans them (but
    eos: generate() never bans it, so a ban of eos is left out with a warning). Sampling is HF's
    do_sample with the same temperature, top-k (0: none) and top-p, applied in that order in both.
    nbest is num_return_sequences: the n best beams, or n samples. Not written, as HF has no such setting
    and they change no token: the seed (generate() draws from torch's global generator, and its samples
    differ from tformer's whatever the seed), static_step and compile_step (how tformer runs a step)."""
    from transformers import GenerationConfig

    beam_search = decode.beam_size > 1 and not decode.sampling
    # GNMT's penalty with alpha = 0 is 1 whatever the length: HF's length_penalty 0, the same scores
    if decode.length_normalization == "gnmt" and decode.length_penalty != 0.0 and beam_search:
        warnings.warn(
            "Hugging Face has no GNMT length penalty: the export uses its average normalisation "
            f"(length_penalty={decode.length_penalty}), so its beam outputs will differ from tformer's",
            stacklevel=3,
        )
    if decode.coverage_penalty > 0 and beam_search:
        warnings.warn(
            f"Hugging Face has no coverage penalty: the export leaves out tformer's coverage_penalty="
            f"{decode.coverage_penalty}, so its beam outputs will differ from tformer's",
            stacklevel=3,
        )
    if decode.max_len_a != 0:
        warnings.warn(
            f"Hugging Face has no length limit that grows with the source: generate() stops after {max_positions} "
            f"tokens (max_length={max_positions + 1}), not at tformer's {decode.max_len_a} x source length + "
            f"{decode.max_len_b}; outputs that "
            "reach tformer's limit differ unless you pass generate() that max_new_tokens",
            stacklevel=3,
        )
    if ids.eos_id in decode.banned_ids:
        warnings.warn(
            f"Hugging Face never bans eos (generate() drops an [eos] entry of bad_words_ids): the export leaves "
            f"out tformer's ban of eos (id {ids.eos_id}), so HF's sentences may end where tformer's go on",
            stacklevel=3,
        )
    # HF refuses to save a beam setting in a greedy config; nbest is 1 there (DecodeConfig's rule is HF's)
    search: dict[str, Any] = {"num_beams": 1, "num_return_sequences": decode.nbest}
    if decode.sampling:  # tformer's sampling draws one path per sample whatever beam_size says
        search.update(do_sample=True, temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p)
    elif beam_search:
        search["num_beams"] = decode.beam_size
        search["length_penalty"] = 0.0 if decode.length_normalization == "none" else decode.length_penalty
        search["early_stopping"] = decode.early_stopping
    # a fixed limit (max_len_a = 0) is HF's max_length, decoder start included; one that grows with the
    # source has no HF counterpart, so the model's own limit is written. Both are clamped as tformer
    # clamps them: 1 to max_positions predicted tokens, after the decoder start token (max_len_b = 0
    # predicts one token in tformer; HF's max_length = 1 would make generate() refuse to run)
    fixed = decode.max_len_a == 0
    max_length = (max(1, min(decode.max_len_b, max_positions)) if fixed else max_positions) + 1
    return GenerationConfig(
        decoder_start_token_id=ids.bos_id,
        bos_token_id=ids.bos_id,
        eos_token_id=ids.eos_id,
        pad_token_id=ids.pad_id,
        forced_eos_token_id=ids.eos_id if decode.forced_eos else None,
        no_repeat_ngram_size=decode.no_repeat_ngram_size,
        bad_words_ids=[[token] for token in decode.banned_ids if token != ids.eos_id] or None,
        min_length=decode.min_len + 1,
        max_length=max_length,
        **search,
    )


@contextlib.contextmanager
def _start_token_loader() -> Iterator[None]:
    """While converting, read MarianConfig with a loader that keeps the start token and the vocabulary."""
    from ctranslate2.converters import transformers as ct2_transformers

    bart, marian = ct2_transformers.BartLoader, ct2_transformers.MarianMTLoader

    class StartTokenMarianLoader(marian):
        def get_model_spec(self, model: Any) -> Any:
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return bart.get_model_spec(self, model)

        def set_decoder(self, spec: Any, decoder: Any) -> None:
            bart.set_decoder(self, spec, decoder)

        def get_vocabulary(self, model: Any, tokenizer: Any) -> list[str]:
            return bart.get_vocabulary(self, model, tokenizer)

        def set_config(self, config: Any, model: Any, tokenizer: Any) -> None:
            bart.set_config(self, config, model, tokenizer)
            # no bos token of its own (an imported OPUS-MT model starts from pad): CTranslate2 cannot
            # load a null bos_token, and with add_source_bos off it only names the start token
            if config.bos_token is None:
                config.bos_token = config.decoder_start_token

    loaders = ct2_transformers._MODEL_LOADERS
    original = loaders["MarianConfig"]
    loaders["MarianConfig"] = StartTokenMarianLoader()
    try:
        yield
    finally:
        loaders["MarianConfig"] = original
