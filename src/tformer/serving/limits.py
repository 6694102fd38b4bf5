"""What one request may ask (`ServeConfig`), and the checks that refuse a request over those limits
before it reaches the batcher, each with an `ApiError` that says which limit and what to send instead."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from tformer.config import DecodeConfig
from tformer.data.corpus import NUL_BYTE_ADVICE, check_no_nul
from tformer.data.piece_floor import surely_too_long
from tformer.decoding.lengths import max_output_lengths
from tformer.decoding.memory import SearchTooLargeError, sentences_per_batch
from tformer.decoding.pipeline import TokenizerLike
from tformer.serving.errors import ApiError, shown
from tformer.serving.schema import TranslateRequest


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Limits on what one request may ask, and the batching window."""

    max_sentences: int = 64
    max_chars: int = 1000
    max_beam: int = 8
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_decode_tokens: int = 65536

    def __post_init__(self) -> None:
        # each limit is also the `tformer serve` flag of the same name
        for name in ("max_sentences", "max_chars", "max_beam", "max_batch_tokens", "max_queue", "max_decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms < math.inf:  # written so that NaN fails too; inf: no window would ever close
            raise ValueError(f"max_wait_ms (--max-wait-ms) must be >= 0 and finite, got {self.max_wait_ms}")

    @property
    def max_body_bytes(self) -> int:
        """Room for max_sentences sentences of max_chars characters at their longest in JSON (12 bytes: a
        character outside the Basic Multilingual Plane escaped as a surrogate pair, "\\ud83d\\ude00", as
        Python's json.dumps writes emoji by default), quotes and commas, and the options."""
        return self.max_sentences * (self.max_chars * 12 + 8) + 4096


# a NUL in a sentence is what UTF-16 text read as UTF-8 (or binary data) gives, as in translate's input
NUL_ADVICE = f"{NUL_BYTE_ADVICE} before sending it"


def check_limits(sentences: list[str], config: ServeConfig) -> None:
    if not sentences:
        raise ApiError(422, "sentences: give at least one sentence")
    if len(sentences) > config.max_sentences:
        raise ApiError(413, f"{len(sentences)} sentences in one request; the limit is {config.max_sentences}")
    for index, sentence in enumerate(sentences):
        if len(sentence) > config.max_chars:
            raise ApiError(413, f"sentence {index} has {len(sentence)} characters; the limit is {config.max_chars}")
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError as error:  # valid JSON ("\ud800") but not text: a lone surrogate
            code = ord(sentence[error.start])
            message = f"sentence {index} holds an unpaired surrogate (U+{code:04X}); send valid Unicode"
            raise ApiError(422, message) from None
        # as translate and Translator refuse a NUL in their input: text mis-decoded, not a sentence
        check_no_nul(sentence, f"sentence {index}", advice=NUL_ADVICE, error=functools.partial(ApiError, 422))


def source_lengths(sentences: list[str], tokenizer: TokenizerLike, max_positions: int) -> list[int]:
    """Each sentence's length in source tokens, eos included; 413 for one the model cannot take."""
    lengths = []
    for index, sentence in enumerate(sentences):
        # refused unencoded, as translate refuses it
        if surely_too_long(tokenizer, "source", sentence, max_positions - 1):
            message = f"sentence {index} has more than {max_positions} tokens ({len(sentence):,} characters)"
            raise ApiError(413, f"{message}; the model accepts at most {max_positions}")
        length = len(tokenizer.encode_source(sentence)) + 1  # + eos
        if length > max_positions:
            raise ApiError(413, f"sentence {index} has {length} tokens; the model accepts at most {max_positions}")
        lengths.append(length)
    return lengths


def check_decode_budget(src_lengths: list[int], settings: DecodeConfig, config: ServeConfig, limit: int) -> None:
    """Refuse a request whose worst case (every hypothesis of every sentence reaching its maximum length)
    would hold the one decoding worker, and every other client, for too long."""
    max_lengths = max_output_lengths(torch.tensor(src_lengths), settings, limit=limit)
    if settings.sampling:  # nbest samples of each sentence
        paths, per_sentence, fewer = settings.nbest, f"{settings.nbest} samples", "fewer samples (nbest)"
    else:
        paths, per_sentence, fewer = settings.beam_size, f"beam {settings.beam_size}", "a smaller beam"
    worst = paths * int(max_lengths.sum())
    if worst > config.max_decode_tokens:
        raise ApiError(
            413,
            f"this request may decode up to {worst} tokens ({len(src_lengths)} sentences x {per_sentence} "
            f"x up to {int(max_lengths.max())} output tokens); the limit is {config.max_decode_tokens} "
            f"(--max-decode-tokens): send fewer sentences, {fewer} or a max_length",
        )


def check_memory(src_lengths: list[int], settings: DecodeConfig, model: Any, device: str | torch.device) -> None:
    """Refuse a request whose longest sentence is too large for the memory at its beam (or nbest samples),
    before it is queued. Translator makes the same check once per call, on the longest sentence of every
    request sharing the call: made there alone, it refused a short request along with a long one it had
    been batched with. A request that passes here passes there, whatever shares its call."""
    longest = max((length for length in src_lengths if length > 1), default=None)  # 1: eos alone, not decoded
    if longest is None:
        return
    try:
        sentences_per_batch(model, settings, source_length=longest, device=device)
    except SearchTooLargeError as error:  # named by the request's field, not translate's flag
        raise ApiError(422, error.named("nbest" if error.setting == "nbest" else "beam")) from None


def decode_config(base: DecodeConfig, request: TranslateRequest, config: ServeConfig, limit: int) -> DecodeConfig:
    """The run's decode settings with the request's beam, nbest and max_length applied."""
    beam = _beam(base, request, config)
    changes: dict[str, Any] = {"beam_size": beam, "nbest": base.nbest if base.sampling else min(base.nbest, beam)}
    if request.nbest is not None:
        # a sampling server draws nbest samples, whatever the beam; DecodeConfig's own message names beam_size
        if request.nbest > beam and not base.sampling:
            where = "the request's" if request.beam is not None else "the server's"
            got = shown(request.nbest)
            raise ApiError(422, f"nbest: at most beam ({beam}, {where}), got {got}; send a larger beam")
        changes["nbest"] = request.nbest
    if request.max_length is not None:
        if request.max_length > limit:
            got = shown(request.max_length)
            raise ApiError(422, f"max_length: at most {limit} (the model's max_positions), got {got}")
        changes.update(max_len_a=0.0, max_len_b=request.max_length)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as error:  # e.g. nbest > beam_size
        raise ApiError(422, str(error).splitlines()[0]) from None


def _beam(base: DecodeConfig, request: TranslateRequest, config: ServeConfig) -> int:
    """The request's beam, else the run's capped at max_beam: the limit bounds the decoding cost of every
    request, including those that leave the beam to the server."""
    if request.beam is None:
        return min(base.beam_size, config.max_beam)
    if request.beam > config.max_beam:
        raise ApiError(422, f"beam: at most {config.max_beam}, got {shown(request.beam)}")
    return request.beam
