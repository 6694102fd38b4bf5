"""Text in, text out: tokenize, batch by length, decode, detokenize, in input order, streaming.

`Translator.translate` reads its input lazily in chunks of `chunk_lines` lines (`translate_chunks` takes
chunks cut by the caller, e.g. whatever lines an interactive pipe has ready). Within a chunk the
sentences are sorted by length and cut into batches of at most `max_batch_tokens` source tokens
(padding included), so little work is spent on padding; results come back in input order, one chunk
at a time, so a long or endless input is translated with bounded memory (the heap's free pages are given
back after each chunk: tformer.decoding.heap). An empty (or blank) line translates to `nbest` empty
translations, without decoding (so every line has an n-best list of the same length).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import torch

from tformer.caller_warnings import warn_caller
from tformer.config import DecodeConfig
from tformer.data.corpus import check_no_nul
from tformer.data.piece_floor import surely_too_long
from tformer.data.tokenizer import unknown_characters
from tformer.decoding import generate
from tformer.decoding.heap import release_free_memory
from tformer.decoding.memory import sentences_per_batch
from tformer.decoding.search_types import DecodingError
from tformer.model.modes import evaluating
from tformer.model.packed import packed_weights
from tformer.runtime import one_thread_after_fork

# lines sorted and batched together: a chunk's longest sentences make its last, smallest batch, decoded for
# the most steps with the fewest rows, so fewer, larger chunks leave fewer such tails; 1,024 lines hold a test
# set such as multi30k's test2016 whole (the translations do not depend on the chunk)
CHUNK_LINES = 1024


def lines_of(lines: Iterable[Any], what: str) -> Iterable[Any]:
    """`lines` itself, after refusing one string (or bytes) where an iterable of them is wanted: iterating
    over a string gives its characters, which would each be translated as a line of its own."""
    if isinstance(lines, str | bytes):
        raise TypeError(f"{what} must be an iterable of strings, not one {type(lines).__name__}: wrap it in a list")
    return lines


_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The one lock of `model` that every Translator over it takes while it decodes a chunk: decoding
    changes the model for the time of a chunk (eval mode, packed weights, the static step's buffers), so
    threads sharing a model take turns instead of undoing each other's changes."""
    with _MODEL_LOCKS_LOCK:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


class TokenizerLike(Protocol):
    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode_source(self, text: str) -> list[int]: ...

    def decode_target(self, ids: list[int]) -> str: ...


@dataclass
class Translation:
    text: str
    tokens: list[int]
    score: float


class Translator:
    """A model, its tokenizer and a DecodeConfig, ready to translate lines of text.

    The model's mode is left as it was: each call decodes in eval mode (dropout off) and then gives every module
    back the mode it had, so a model still being trained can be translated with between steps.

    Thread-safe: Translators (one shared, or several over one model) called from several threads take turns,
    a chunk at a time, on the model's lock (`model_lock`); each call's results are those it gets alone."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerLike,
        config: DecodeConfig,
        *,
        device: str | torch.device | None = None,
        max_batch_tokens: int = 4096,
        chunk_lines: int = CHUNK_LINES,
        truncate: bool = False,
        warn_unknown: bool = False,
    ) -> None:
        """`device`: where to decode; the model is moved there (`model.to(device)`, in place, as for any
        `nn.Module`); None (the default) decodes where the model's weights are. `truncate`: a line longer
        than the model accepts is cut to its first pieces (with a warning) instead of stopping the job
        with a DecodingError. `warn_unknown`: warn once, at the first line holding any, of characters the
        tokenizer has no piece for (read as <unk>), as `tformer translate` and `evaluate` do."""
        if not isinstance(config, DecodeConfig):  # else an AttributeError at the first line translated
            hint = " (a run's is run.experiment.decode)" if hasattr(config, "decode") else ""
            raise TypeError(f"config must be a DecodeConfig{hint}, got {type(config).__name__}")
        _check_vocabulary(model, tokenizer)
        if max_batch_tokens < 1 or chunk_lines < 1:
            raise DecodingError(
                f"max_batch_tokens and chunk_lines must be positive; got {max_batch_tokens}, {chunk_lines}"
            )
        if device is None:
            device = next(model.parameters()).device
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.chunk_lines = chunk_lines
        self.truncate = truncate
        self._unknown_warned = not warn_unknown  # characters read as <unk> are named once, at the first line
        one_thread_after_fork()  # a forked child (gunicorn --preload) decodes on one thread rather than hang

    def __repr__(self) -> str:
        return (
            f"Translator({type(self.model).__name__} on {self.device}, {self.tokenizer!r}, {self.config!r}, "
            f"max_batch_tokens={self.max_batch_tokens}, chunk_lines={self.chunk_lines}, truncate={self.truncate})"
        )

    def translate(self, lines: Iterable[str]) -> Iterator[list[Translation]]:
        """The n-best list of every line, in input order, produced chunk by chunk. `lines` is an iterable
        of strings (a list, an open file); one string alone is refused, not translated character by character."""
        iterator = iter(lines_of(lines, "lines"))  # checked now, not at the first next()
        return self.translate_chunks(iter(lambda: list(islice(iterator, self.chunk_lines)), []))

    def translate_chunks(self, chunks: Iterable[list[str]]) -> Iterator[list[Translation]]:
        """`translate` for input already cut into chunks (each translated as a whole, then yielded)."""
        first_line = 0
        for chunk in lines_of(chunks, "chunks"):
            results = self._translate_chunk(chunk, first_line)
            release_free_memory()  # the chunk's tensors are freed: keep a long job's footprint flat
            yield from results
            first_line += len(chunk)

    def translate_texts(self, lines: Sequence[str]) -> list[str]:
        """The best translation of every line."""
        return [translations[0].text for translations in self.translate(lines)]

    def _translate_chunk(self, chunk: list[str], first_line: int) -> list[list[Translation]]:
        chunk = list(lines_of(chunk, "a chunk"))
        encoded = [self._fitted(line, first_line + index + 1) for index, line in enumerate(chunk)]
        if not self._unknown_warned:
            self._warn_unknown(chunk, encoded, first_line)
        empty = [Translation(text="", tokens=[], score=0.0)] * self.config.nbest
        results: list[list[Translation]] = [list(empty) for _ in chunk]
        sentences = [index for index, ids in enumerate(encoded) if len(ids) > 1]  # not just eos: not empty
        if sentences:
            # a beam too large for the machine is refused before any of the chunk is decoded
            longest = max(len(encoded[index]) for index in sentences)
            sentences_per_batch(self.model, self.config, source_length=longest, device=self.device)
            # packed once for the chunk's batches (generate would pack per batch)
            with model_lock(self.model), evaluating(self.model), packed_weights(self.model):
                for batch in self._batches(encoded, sentences):
                    self._translate_batch(batch, encoded, results, first_line)
        return results

    def _fitted(self, line: str, number: int) -> list[int]:
        """The ids of input line `number`, with eos, refused (or cut, with truncate) if longer than the model
        accepts. A line that surely is (`surely_too_long`) is refused before it is encoded: encoding a line of
        megabytes takes gigabytes."""
        limit = self.model.config.max_positions
        if not isinstance(line, str):
            raise TypeError(f"input line {number} is a {type(line).__name__}, not a str: give the lines as text")
        check_no_nul(line, f"input line {number}", error=DecodingError)  # as translate and the server refuse it
        if not self.truncate and surely_too_long(self.tokenizer, "source", line, limit - 1):
            raise DecodingError(
                f"input line {number} has more than {limit} tokens ({len(line):,} characters); the model accepts "
                f"at most {limit}: {_too_long_advice(limit)}"
            )
        ids = [*self._encoded(line, number, limit), self.tokenizer.eos_id]
        if len(ids) <= limit:
            return ids
        count = f"more than {limit}" if self._headed else len(ids)
        where = f"input line {number} has {count} tokens; the model accepts at most {limit}"
        if not self.truncate:
            raise DecodingError(f"{where}: {_too_long_advice(limit)}")
        warnings.warn(f"{where}: translated its first {limit - 1} and eos", UserWarning, stacklevel=3)
        return [*ids[: limit - 1], self.tokenizer.eos_id]

    def _warn_unknown(self, chunk: list[str], encoded: list[list[int]], first_line: int) -> None:
        """One warning for characters the tokenizer has no piece for (a Chinese character beyond
        `data.character_coverage`, without byte fallback): read as <unk>, they were lost without a word."""
        unk_id = getattr(self.tokenizer, "unk_id", None)
        index = next((i for i, ids in enumerate(encoded) if unk_id is not None and unk_id in ids), None)
        if index is None:
            return
        self._unknown_warned = True
        pieces = getattr(self.tokenizer, "source_pieces", lambda line: [])(chunk[index])
        unknown = unknown_characters(p for p, i in zip(pieces, encoded[index], strict=False) if i == unk_id)
        shown = f" ({' '.join(unknown)})" if unknown else ""
        warn_caller(
            f"input line {first_line + index + 1} holds characters the tokenizer has no piece for{shown}: the model "
            "reads them as <unk> and cannot translate them (warned once; a tokenizer trained with "
            "data.byte_fallback = true keeps every character: docs/training.md)"
        )

    @property
    def _headed(self) -> bool:
        """Whether a line is encoded only as far as truncating it needs (`Tokenizer.encode_source_head`)."""
        return self.truncate and hasattr(self.tokenizer, "encode_source_head")

    def _encoded(self, line: str, number: int, limit: int) -> list[int]:
        """The line's ids; with truncate, only its first `limit` or more where the tokenizer can stop early
        (exactly the first ones of the whole line's), so a line of megabytes is not encoded whole."""
        try:
            if self._headed:
                return self.tokenizer.encode_source_head(line, limit)
            return self.tokenizer.encode_source(line)
        except ValueError as error:  # a tokenizer's refusal (a lone surrogate at some index): name the line
            raise DecodingError(f"input line {number}: {error}") from None

    def _translate_batch(
        self, batch: list[int], encoded: list[list[int]], results: list[list[Translation]], first_line: int
    ) -> None:
        """Decode the sentences `batch` (indices into `encoded`, whose first is input line `first_line` + 1)
        and store their n-best lists in `results`."""
        width = len(encoded[batch[-1]])  # sorted by length: the last is the longest
        src = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, index in enumerate(batch):
            src[row, : len(encoded[index])] = torch.tensor(encoded[index])
        mask = torch.arange(width)[None, :] < torch.tensor([len(encoded[i]) for i in batch])[:, None]
        hypotheses = generate(
            self.model,
            src.to(self.device),
            src_pad_mask=mask.to(self.device),
            bos_id=self.tokenizer.bos_id,
            eos_id=self.tokenizer.eos_id,
            config=self.config,
        )
        unscored = [index for index, nbest in zip(batch, hypotheses, strict=True) if _scored_not_a_number(nbest)]
        if unscored:  # the batch is sorted by length: name the first such line of the input
            raise NotANumberError(first_line + min(unscored) + 1, self._why_not_a_number())
        for index, nbest in zip(batch, hypotheses, strict=True):
            results[index] = [
                Translation(text=self.tokenizer.decode_target(h.tokens), tokens=h.tokens, score=h.score) for h in nbest
            ]

    def _why_not_a_number(self) -> str:
        """Why a line has no translation when the model's scores for it were NaN (beam search then finishes no
        hypothesis at all; greedy search and sampling return pad tokens scored NaN)."""
        dtype = next(self.model.parameters()).dtype
        if dtype in (torch.float32, torch.float64):
            why = "its weights hold NaN: check the checkpoint it was loaded from"
        else:  # float16's range is soon exceeded; bfloat16 keeps 2-3 significant digits
            precision = str(dtype).removeprefix("torch.")
            why = f"weights that hold NaN, or {precision} arithmetic: decode with --dtype float32"
        return f"the model's scores are NaN (not a number), so it has no translation; {why}"

    def _batches(self, encoded: list[list[int]], indices: list[int]) -> Iterator[list[int]]:
        """`indices` into `encoded`, shortest first, in batches of at most max_batch_tokens padded tokens."""
        order = sorted(indices, key=lambda i: len(encoded[i]))
        batch: list[int] = []
        for index in order:
            if batch and (len(batch) + 1) * len(encoded[index]) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch


def _scored_not_a_number(nbest: list[Any]) -> bool:
    """Whether an n-best list is what NaN scores leave: none at all (beam search), or scored NaN."""
    return not nbest or any(math.isnan(hypothesis.score) for hypothesis in nbest)


class NotANumberError(DecodingError):
    """The model scored input line `line` NaN: a fault of the model or its dtype, not of the line."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"input line {line}: {reason}")
        self.line = line
        self.reason = reason


def _check_vocabulary(model: Any, tokenizer: TokenizerLike) -> None:
    """Refuse a tokenizer (another run's) whose source ids the model has no embeddings for: they failed at the
    first line that held one, as ids out of the model's vocabulary, or not at all where no line did. (A model's
    vocabulary may be the larger: an imported Marian model's embeddings can hold more ids than its files.)"""
    tokenizer_size = getattr(tokenizer, "src_vocab_size", None)
    model_size = getattr(getattr(model, "config", None), "src_vocab_size", None)
    if tokenizer_size is not None and model_size is not None and tokenizer_size > model_size:
        raise DecodingError(
            f"the tokenizer's source vocabulary ({tokenizer_size} ids) is larger than the model's ({model_size}): "
            "give the tokenizer the model was trained with"
        )


def _too_long_advice(limit: int) -> str:
    """What to do with a line of more than `limit` tokens (eos included), said by both of its refusals."""
    return f"shorten it, or translate its first {limit - 1} pieces and eos with --truncate"
