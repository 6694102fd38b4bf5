"""The decoding settings `generate()` uses for a Hugging Face MarianMT directory, as tformer's DecodeConfig.

Which settings: `MarianMTModel.from_pretrained` reads generation_config.json when the directory has one,
and then no generation key of config.json; without it, it reads config.json's keys as the file holds
them (no MarianConfig default is added). `generation_settings` follows that rule.

How they map: num_beams, num_return_sequences (tformer's nbest), length_penalty (tformer's "average"
normalisation is Hugging Face's), no_repeat_ngram_size, early_stopping (true or false); min_length and
max_length count the decoder start token in HF, so tformer's limits are one less (min_new_tokens and
max_new_tokens are tformer's as they are, and win over min_length and max_length as in HF); single-token
`bad_words_ids` become `banned_ids` (but eos, which generate() never bans), `forced_eos_token_id`
`forced_eos`. `do_sample` (with one beam) becomes tformer's sampling with the same temperature, top_k
and top_p, applied in the same order (generate()'s defaults when unset: 1.0, 50, 1.0); the samples
themselves differ, drawn from another random stream. A setting that changes generate()'s output and has
no tformer counterpart (beam sampling, typical_p, min_p, repetition penalties, a forced first token,
several eos tokens, multi-token bans, ...) is refused in one line naming it, rather than imported as a
different decoder. Sampling parameters are ignored without do_sample, as generate() ignores them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tformer.config import DecodeConfig

if TYPE_CHECKING:
    from transformers import MarianConfig

GENERATION_FILE = "generation_config.json"

# settings tformer cannot reproduce -> the values with which generate() behaves as if they were unset
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "penalty_alpha": (),
    "forced_bos_token_id": (),
    "forced_decoder_ids": ([],),
    "suppress_tokens": ([],),
    "begin_suppress_tokens": ([],),
    "sequence_bias": ({},),
    "exponential_decay_length_penalty": (),
    "renormalize_logits": (False,),
    "constraints": ([],),
    "force_words_ids": ([],),
    "guidance_scale": (1.0,),
    "max_time": (),
    "stop_strings": ([],),
    "token_healing": (False,),
    "dola_layers": (),
    "watermarking_config": (),
}
# ... and those that only sampling reads
_NEUTRAL_WHEN_SAMPLING: dict[str, tuple[Any, ...]] = {
    "typical_p": (1.0,),
    "min_p": (),
    "top_h": (),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
}
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # generate()'s, for unset values


def generation_settings(file_settings: dict[str, Any] | None, model_config: dict[str, Any]) -> dict[str, Any]:
    """The settings generate() uses: generation_config.json's (`file_settings`) when the directory has
    one, else config.json's (`model_config`, as the file holds it); None values left out."""
    settings = model_config if file_settings is None else file_settings
    return {key: value for key, value in settings.items() if value is not None}


def decoder_start_id(settings: dict[str, Any], hf_config: MarianConfig) -> int:
    """generate() starts from the generation settings' decoder start (else their bos) token."""
    for key in ("decoder_start_token_id", "bos_token_id"):
        if isinstance(settings.get(key), int):
            return settings[key]
    return hf_config.decoder_start_token_id


def decode_config(settings: dict[str, Any], *, max_positions: int, eos_id: int, source: str) -> DecodeConfig:
    """tformer's DecodeConfig for generate()'s `settings`; `source` names them in errors."""
    _check_types(settings, source=source)
    _refuse_what_tformer_lacks(settings, eos_id=eos_id, source=source)
    early_stopping = settings.get("early_stopping", False)
    if early_stopping not in (True, False):  # "never": HF's exact-but-slow stopping rule
        raise ValueError(
            f"{source}: early_stopping={early_stopping!r} is not supported; tformer's beam search "
            "stops as Hugging Face's early_stopping=false or true (set one of them)"
        )
    # generate() refuses these: no token to generate (max_new_tokens when it reads the file, max_length in
    # generate(), as the decoder start token alone fills it)
    if settings.get("max_new_tokens", 1) < 1:
        raise ValueError(f"{source}: max_new_tokens={settings['max_new_tokens']} must be at least 1")
    if "max_new_tokens" not in settings and settings.get("max_length", 2) < 2:
        raise ValueError(
            f"{source}: max_length={settings['max_length']} must be at least 2 (it counts the decoder start token)"
        )
    # HF's max_length counts the decoder start token; a forced eos is the last of the tokens after it
    max_new = settings.get("max_new_tokens", int(settings.get("max_length", 512)) - 1)
    min_new = settings.get("min_new_tokens", int(settings.get("min_length", 0)) - 1)
    sampling = settings.get("do_sample", False) is True
    shaping = {key: settings.get(key, default) for key, default in HF_SAMPLING_DEFAULTS.items()} if sampling else {}
    try:
        return DecodeConfig(
            sampling=sampling,
            **shaping,
            beam_size=int(settings.get("num_beams", 1)),
            nbest=int(settings.get("num_return_sequences", 1)),
            max_len_a=0.0,
            max_len_b=max(1, min(int(max_new), max_positions)),
            forced_eos=settings.get("forced_eos_token_id") is not None,
            early_stopping=bool(early_stopping),
            min_len=max(0, int(min_new)),
            length_normalization="average",
            length_penalty=float(settings.get("length_penalty", 1.0)),
            no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size", 0)),
            banned_ids=tuple(banned_ids(settings, eos_id=eos_id)),
        )
    except ValueError as error:  # a value out of range (num_beams 0, say): DecodeConfig names its own setting
        raise ValueError(f"{source}: {error}") from None


def _check_types(settings: dict[str, Any], *, source: str) -> None:
    """The settings read below have the types generate() takes (a JSON file may hold anything)."""
    integers = ("num_beams", "num_return_sequences", "max_length", "min_length", "max_new_tokens", "min_new_tokens")
    for key in (*integers, "no_repeat_ngram_size"):
        if key in settings and not _is_integer(settings[key]):
            raise ValueError(f"{source}: {key}={settings[key]!r} must be an integer")
    if settings.get("do_sample", False) not in (True, False):
        raise ValueError(f"{source}: do_sample={settings['do_sample']!r} must be true or false")
    if settings.get("do_sample") is True:
        for key in ("temperature", "top_p"):
            if key in settings and not _is_number(settings[key]):
                raise ValueError(f"{source}: {key}={settings[key]!r} must be a number")
        if "top_k" in settings and not _is_integer(settings["top_k"]):
            raise ValueError(f"{source}: top_k={settings['top_k']!r} must be an integer")
    penalty = settings.get("length_penalty", 1.0)
    if not _is_number(penalty):
        raise ValueError(f"{source}: length_penalty={penalty!r} must be a number")
    bad_words = settings.get("bad_words_ids", [])
    if not (isinstance(bad_words, list) and all(isinstance(words, list) for words in bad_words)) or not all(
        _is_integer(token) for words in bad_words for token in words
    ):
        raise ValueError(f"{source}: bad_words_ids={bad_words!r} must be a list of lists of token ids")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_integer(value) or isinstance(value, float)


def banned_ids(settings: dict[str, Any], *, eos_id: int) -> list[int]:
    """The single tokens of `bad_words_ids`, less eos: generate() drops an `[eos]` entry (its
    NoBadWordsLogitsProcessor never bans eos), so sentences still end."""
    return sorted({words[0] for words in settings.get("bad_words_ids", [])} - {eos_id})


def _refuse_what_tformer_lacks(settings: dict[str, Any], *, eos_id: int, source: str) -> None:
    sampling = settings.get("do_sample") is True
    if sampling and settings.get("num_beams", 1) != 1:
        raise ValueError(
            f"{source}: do_sample=True with num_beams={settings['num_beams']} is beam sampling, which tformer "
            "does not have; set num_beams to 1 (sampling) or do_sample to false (beam search) to import this model"
        )
    for key, neutral in {**_NEUTRAL, **(_NEUTRAL_WHEN_SAMPLING if sampling else {})}.items():
        if key in settings and settings[key] not in neutral:
            fix = f"remove it (or set it to {neutral[0]!r})" if neutral else "remove it"
            raise ValueError(
                f"{source}: {key}={settings[key]!r} changes generate()'s output and tformer has no such "
                f"setting; {fix} to import this model"
            )
    for words in settings.get("bad_words_ids", []):
        if len(words) != 1:
            raise ValueError(
                f"{source}: bad_words_ids entry {words!r} bans a sequence of tokens; tformer bans single "
                "tokens only (remove the entry to import this model)"
            )
    for key in ("eos_token_id", "forced_eos_token_id"):
        value = settings.get(key, eos_id)
        if (value if isinstance(value, list) else [value]) != [eos_id]:
            raise ValueError(
                f"{source}: {key}={value!r}, but tformer ends sentences with one eos token, the tokenizer's "
                f"({eos_id}); set {key} to {eos_id} to import this model"
            )
