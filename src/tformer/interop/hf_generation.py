"""The decoding settings `generate()` uses for a Hugging Face MarianMT directory, as tformer's DecodeConfig.

Which settings: `MarianMTModel.from_pretrained` reads generation_config.json when the directory has one,
and then no generation key of config.json; without it, it reads config.json's keys as the file holds
them (no MarianConfig default is added). `generation_settings` follows that rule.

How they map: num_beams, length_penalty (tformer's "average" normalisation is Hugging Face's),
no_repeat_ngram_size, early_stopping (true or false); min_length and max_length count the decoder start
token in HF, so tformer's limits are one less; single-token `bad_words_ids` become `banned_ids`,
`forced_eos_token_id` `forced_eos`. generate() starts from the settings' decoder start token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tformer.config import DecodeConfig

if TYPE_CHECKING:
    from transformers import MarianConfig

GENERATION_FILE = "generation_config.json"


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
    early_stopping = settings.get("early_stopping", False)
    if early_stopping not in (True, False):  # "never": HF's exact-but-slow stopping rule
        raise ValueError(
            f"{source}: early_stopping={early_stopping!r} is not supported; tformer's beam search "
            "stops as Hugging Face's early_stopping=false or true (set one of them)"
        )
    # HF's max_length counts the decoder start token; a forced eos is the last of the tokens after it
    max_new = int(settings.get("max_length", 512)) - 1
    min_new = int(settings.get("min_length", 0)) - 1
    return DecodeConfig(
        beam_size=int(settings.get("num_beams", 1)),
        nbest=1,
        max_len_a=0.0,
        max_len_b=max(1, min(int(max_new), max_positions)),
        forced_eos=settings.get("forced_eos_token_id") is not None,
        early_stopping=bool(early_stopping),
        min_len=max(0, min_new),
        length_normalization="average",
        length_penalty=float(settings.get("length_penalty", 1.0)),
        no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size", 0)),
        banned_ids=tuple(banned_ids(settings)),
    )


def banned_ids(settings: dict[str, Any]) -> list[int]:
    return sorted({words[0] for words in settings.get("bad_words_ids", []) if len(words) == 1})
