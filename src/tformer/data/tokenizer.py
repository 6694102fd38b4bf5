"""Subword tokenization with sentencepiece: one joint model, or separate source and target models.

Normalisation happens here, in Python, in one visible function (`normalize`): NFKC, U+2581 (the
character sentencepiece uses to mark spaces) turned into a space, and every run of whitespace collapsed
to one space. Sentencepiece itself is trained with the "identity" rule, so it never changes a character
behind our back. The guarantee is `decode(encode(x)) == normalize(x)` for any text whose characters
all occurred in the training data (others become <unk>, decoded as " ⁇ "; a character counts only where it
occurred outside the spellings of the special pieces, "<pad>", "<s>", "</s>", "<unk>" and with byte fallback
"<0x00>" to "<0xFF>", which sentencepiece's trainer deletes from its training text), and for any text at all when
the tokenizer was trained with `byte_fallback`: a character that is not a piece is then spelled as its
UTF-8 bytes, one piece each (`<0xE7>`), which decoding joins back into the character. The 256 byte
pieces come right after the special ids (ids 4 to 259) and count towards `vocab_size`.

Special ids are fixed for every tokenizer tformer trains: pad=0, bos=1, eos=2, unk=3. A model trained
elsewhere (`--tokenizer DIR`) may use other ids but must have all four pieces: sentencepiece's own
default has no pad piece (pad_id=-1), and loading such a model is a one-line error saying how to retrain
it. Encoding returns plain pieces without bos/eos; `tformer.data.batching` adds them where the
conventions say.

Training runs in memory (no temporary files), is quiet, and is deterministic for the same data, seed
and `num_threads`: sentencepiece's result depends on its thread count, so that is a fixed argument,
never the machine's core count.
"""

from __future__ import annotations

import functools
import io
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import sentencepiece as spm

from tformer.config.pieces import BYTE_PIECES, SPECIAL_PIECES, smallest_vocab_size
from tformer.data.piece_floor import MARKER, PieceFloor, piece_floor
from tformer.input_paths import read_at_most

ModelType = Literal["bpe", "unigram"]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_NAMES = ("pad", "bos", "eos", "unk")  # in the order of `_special_ids`
JOINT_FILE = "spm.model"
SRC_FILE = "spm.src.model"
TGT_FILE = "spm.tgt.model"

_WHITESPACE = re.compile(r"\s+")
HEAD_CHARACTERS = 8  # characters per piece wanted, in the first prefix `encode_source_head` tries
# sentencepiece's refusal when the characters to keep outnumber the vocabulary ("1000 vs 3005.")
_TOO_MANY_CHARACTERS = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded as asked; the message says why in one line."""


def normalize(text: str) -> str:
    """The canonical form of `text` that encoding then decoding reproduces exactly."""
    refuse_surrogates(text)
    text = unicodedata.normalize("NFKC", text).replace("\u2581", " ")
    return _WHITESPACE.sub(" ", text).strip()


def unknown_characters(unknown_pieces: Iterable[str]) -> Counter[str]:
    """How often each character of pieces read as <unk> occurs, in order of first appearance: the characters
    a tokenizer has no piece for. The whitespace marker a piece may begin with is not one of them."""
    characters = Counter(c for piece in unknown_pieces for c in piece)
    characters.pop(MARKER, None)
    return characters


def refuse_surrogates(text: str) -> None:
    """A one-line error for a lone surrogate (what bytes decoded with errors="surrogateescape" become, or a
    "\\ud800" escape in JSON), which sentencepiece refuses with a bare "Unable to cast" RuntimeError.
    Costs nothing for ASCII text (a flag) and one UTF-8 encoding, in C, for the rest."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(
            f"text holds an unpaired surrogate (U+{ord(text[error.start]):04X}) at index {error.start}; give valid "
            "Unicode (decode its bytes in their own encoding, or with errors='replace')"
        ) from None


def _normalize_each(texts: Iterable[str]) -> list[str]:
    """`normalize` of every text; a refusal names the text by its index in `texts`."""
    refuse_one_text(texts, "texts")
    normalized = []
    for index, text in enumerate(texts):
        try:
            normalized.append(normalize(text))
        except TokenizerError as error:
            raise TokenizerError(f"texts[{index}]: {error}") from None
        except TypeError as error:
            raise TypeError(f"texts[{index}]: {error}") from None
    return normalized


def refuse_one_text(texts: Iterable[str], name: str) -> None:
    """Where several texts are wanted, one string would be taken as its characters, each a text of its own."""
    if isinstance(texts, str | bytes):
        raise TypeError(f"{name} must be an iterable of strings, not one {type(texts).__name__}: wrap it in a list")


class Tokenizer:
    """One sentencepiece model shared by both languages (`joint`) or one per side."""

    def __init__(self, source: spm.SentencePieceProcessor, target: spm.SentencePieceProcessor | None = None) -> None:
        self._src = source
        self._tgt = target if target is not None else source
        self._joint = target is None
        if _special_ids(self._src) != _special_ids(self._tgt):
            raise TokenizerError(
                f"the source and target models disagree on special ids: the source has {_named_ids(self._src)}, the "
                f"target {_named_ids(self._tgt)}; retrain one of them with the other's ids (sentencepiece's --pad_id, "
                "--bos_id, --eos_id and --unk_id)"
            )

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        sources: Sequence[str],
        targets: Sequence[str],
        *,
        vocab_size: int,
        model_type: ModelType = "bpe",
        joint: bool = True,
        seed: int = 0,
        num_threads: int = 1,
        character_coverage: float = 1.0,
        byte_fallback: bool = False,
    ) -> Tokenizer:
        """Train on the given sentences. `vocab_size` is an upper bound: tiny corpora get fewer pieces
        (`hard_vocab_limit=False`); read `src_vocab_size` / `tgt_vocab_size` for the real sizes.
        `character_coverage`: the share of the text's characters that must be pieces of their own; the
        rarest characters beyond it are left out (encoded as <unk>). 1.0 keeps them all.
        `byte_fallback`: 256 more pieces, one per byte value, spell the characters left out (or never
        seen) as their UTF-8 bytes instead of <unk>, so every text round-trips."""
        refuse_one_text(sources, "sources")
        refuse_one_text(targets, "targets")
        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        smallest = smallest_vocab_size(byte_fallback=byte_fallback)
        if vocab_size < smallest:
            byte_pieces = f" + {BYTE_PIECES} byte pieces" if byte_fallback else ""
            raise TokenizerError(
                f"vocab_size must be at least {smallest} ({SPECIAL_PIECES} special ids{byte_pieces} + 1 piece), "
                f"got {vocab_size}"
            )
        if not 0.98 <= character_coverage <= 1.0:  # sentencepiece's own bounds
            raise TokenizerError(f"character_coverage must be between 0.98 and 1.0, got {character_coverage}")
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            seed=seed,
            num_threads=num_threads,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
        )
        if joint:
            return cls(_train_model([*sources, *targets], name="joint", **options))
        return cls(_train_model(sources, name="source", **options), _train_model(targets, name="target", **options))

    @classmethod
    def from_files(cls, directory: str | Path) -> Tokenizer:
        """Load what `to_files` wrote: `spm.model` (joint) or `spm.src.model` + `spm.tgt.model`."""
        directory = Path(directory)
        joint, src, tgt = (directory / name for name in (JOINT_FILE, SRC_FILE, TGT_FILE))
        if joint.exists() and (src.exists() or tgt.exists()):
            raise TokenizerError(f"{directory} holds both {JOINT_FILE} and {SRC_FILE}/{TGT_FILE}; keep one kind")
        if joint.exists():
            return cls(_load_model(joint))
        if src.exists() and tgt.exists():
            return cls(_load_model(src), _load_model(tgt))
        raise TokenizerError(f"no tokenizer in {directory}: expected {JOINT_FILE}, or {SRC_FILE} and {TGT_FILE}")

    def model_proto(self, side: str) -> bytes:
        """The sentencepiece model of `side` ("source" or "target"; one model for both when joint), serialized
        as `to_files` writes it: for a converter, which needs no file (nor the system's temporary directory)."""
        return (self._src if side == "source" else self._tgt).serialized_model_proto()

    def to_files(self, directory: str | Path) -> list[Path]:
        """Write the model file(s) into `directory` (created if needed) and return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._joint:
            models = [(directory / JOINT_FILE, self._src)]
        else:
            models = [(directory / SRC_FILE, self._src), (directory / TGT_FILE, self._tgt)]
        for path, model in models:
            path.write_bytes(model.serialized_model_proto())
        return [path for path, _ in models]

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def joint(self) -> bool:
        return self._joint

    @property
    def byte_fallback(self) -> bool:
        """Whether characters that are not pieces are spelled as byte pieces (on both sides) rather than <unk>."""
        return all(model.is_byte(model.piece_to_id("<0x00>")) for model in (self._src, self._tgt))

    @functools.cached_property
    def source_floor(self) -> PieceFloor:
        """What the source vocabulary says about the fewest pieces a line can take (`surely_longer`)."""
        return piece_floor(self._src)

    @functools.cached_property
    def target_floor(self) -> PieceFloor:
        return self.source_floor if self._joint else piece_floor(self._tgt)

    @functools.cached_property
    def _source_splits_at_spaces(self) -> bool:
        return _splits_at_spaces(self._src)

    @property
    def src_vocab_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self._tgt.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._src.pad_id()

    @property
    def bos_id(self) -> int:
        return self._src.bos_id()

    @property
    def eos_id(self) -> int:
        return self._src.eos_id()

    @property
    def unk_id(self) -> int:
        return self._src.unk_id()

    # ---- encoding and decoding ----------------------------------------------------------------------

    def encode_source(self, text: str) -> list[int]:
        return self._src.encode(normalize(text))

    def encode_target(self, text: str) -> list[int]:
        return self._tgt.encode(normalize(text))

    def encode_source_head(self, text: str, pieces: int) -> list[int]:
        """The first pieces of `encode_source(text)`, at least `pieces` of them (all of it if it has fewer),
        found by encoding a prefix of `text` cut before a whitespace character, twice as long each time
        until it is enough: the ids are exactly `encode_source(text)[:len(ids)]`, but a line of megabytes
        is not encoded whole (that takes about 50 bytes of memory per character) to keep its first few
        hundred pieces. Exact because a piece never spans a space (`_splits_at_spaces`): the pieces of a
        prefix ending at a word are the line's own, up to there. A vocabulary with pieces across spaces
        (sentencepiece's split_by_whitespace=false), or a text without whitespace, is encoded whole."""
        size = max(pieces, 1) * HEAD_CHARACTERS
        if size < len(text) and self._source_splits_at_spaces:
            refuse_surrogates(text)  # anywhere in the line, as encoding it whole would
            while size < len(text):
                space = _WHITESPACE.search(text, size)
                if space is None:
                    break
                ids = self._src.encode(normalize(text[: space.start()]))
                if len(ids) >= pieces:
                    return ids
                size = 2 * space.end()
        return self.encode_source(text)  # a short line (every line of most inputs): checked once, by normalize

    def encode_sources(self, texts: Iterable[str]) -> list[list[int]]:
        """Batch encoding: one call into sentencepiece for the whole list is several times faster."""
        return self._src.encode(_normalize_each(texts))

    def encode_targets(self, texts: Iterable[str]) -> list[list[int]]:
        return self._tgt.encode(_normalize_each(texts))

    def decode_source(self, ids: Iterable[int]) -> str:
        return self._decode(self._src, ids)

    def decode_target(self, ids: Iterable[int]) -> str:
        """Text of the ids; pad, bos and eos are dropped wherever they occur."""
        return self._decode(self._tgt, ids)

    def decode_targets(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self._decode(self._tgt, ids) for ids in batch]

    def source_pieces(self, text: str) -> list[str]:
        """The subword strings of `encode_source(text)`, one per id (axis labels for attention maps)."""
        return self._src.encode(normalize(text), out_type=str)

    def target_pieces(self, text: str) -> list[str]:
        return self._tgt.encode(normalize(text), out_type=str)

    def id_to_source_piece(self, ids: Iterable[int]) -> list[str]:
        return [self._src.id_to_piece(i) for i in self._checked(self._src, ids)]

    def id_to_target_piece(self, ids: Iterable[int]) -> list[str]:
        """Piece strings of generated ids (specials included), e.g. to label a decoder attention axis."""
        return [self._tgt.id_to_piece(i) for i in self._checked(self._tgt, ids)]

    def _decode(self, model: spm.SentencePieceProcessor, ids: Iterable[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        # strip: an output cut at the maximum length may end in a lone word-boundary piece (a space)
        return model.decode([i for i in self._checked(model, ids) if i not in skip]).strip()

    @staticmethod
    def _checked(model: spm.SentencePieceProcessor, ids: Iterable[int]) -> list[int]:
        values = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        size = model.get_piece_size()
        bad = [i for i in values if not 0 <= i < size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary of size {size}")
        return values

    def fingerprint(self) -> int:
        """A CRC-32 of the model file(s): equal for tokenizers that split every text the same way."""
        checksum = zlib.crc32(self._src.serialized_model_proto())
        return checksum if self._joint else zlib.crc32(self._tgt.serialized_model_proto(), checksum)

    def __repr__(self) -> str:
        kind = "joint" if self._joint else "separate"
        byte_fallback = ", byte_fallback=True" if self.byte_fallback else ""
        sizes = f"src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size}"
        # a model trained elsewhere may place them otherwise: the run's `tokenizer:` line shows where
        own = (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
        ids = zip(SPECIAL_NAMES, _special_ids(self._src), own, strict=True)
        moved = "".join(f", {name}_id={i}" for name, i, default in ids if i != default)
        return f"Tokenizer({kind}, {sizes}{moved}{byte_fallback})"


def sample_pairs(
    sources: Sequence[str], targets: Sequence[str], *, max_pairs: int, seed: int
) -> tuple[Sequence[str], Sequence[str]]:
    """At most `max_pairs` of the aligned pairs (all of them when 0 or when there are no more), drawn
    without replacement by `seed` and kept in corpus order: what a tokenizer is trained on."""
    if max_pairs == 0 or len(sources) <= max_pairs:
        return sources, targets
    chosen = np.sort(np.random.default_rng(seed).choice(len(sources), size=max_pairs, replace=False))
    return [sources[i] for i in chosen], [targets[i] for i in chosen]


def _train_model(
    sentences: Sequence[str],
    *,
    name: str,
    vocab_size: int,
    model_type: str,
    seed: int,
    num_threads: int,
    character_coverage: float,
    byte_fallback: bool,
) -> spm.SentencePieceProcessor:
    texts = [text for text in (normalize(s) for s in sentences) if text]
    if not texts:
        raise TokenizerError(f"cannot train the {name} tokenizer: no non-empty sentences")
    # Sentencepiece silently skips sentences longer than max_sentence_length bytes; allow the longest.
    longest = max(len(text.encode("utf-8")) for text in texts)
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            hard_vocab_limit=False,
            normalization_rule_name="identity",
            max_sentence_length=max(4192, longest + 1),
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        reason = str(error).splitlines()[0].split("] ")[-1].split(" Increase vocab_size")[0]
        too_many_characters = _TOO_MANY_CHARACTERS.search(reason)
        if too_many_characters:
            lower = "(0.9995 suits Chinese or Japanese)" if character_coverage > 0.9995 else "further (down to 0.98)"
            included, left_out = f"the {SPECIAL_PIECES} special ones", "<unk>"
            if byte_fallback:
                included, left_out = f"{included} and the {BYTE_PIECES} byte pieces", "byte pieces"
            advice = f", or lower character_coverage {lower} to leave the rarest characters out as {left_out}"
            if character_coverage <= 0.98:  # already sentencepiece's lowest: nothing more to leave out
                advice = " (character_coverage is already at its lowest, 0.98)"
            reason = (
                f"the characters that make up character_coverage={character_coverage} of the text need "
                f"{too_many_characters[1]} pieces, {included} included; raise vocab_size to at least that{advice}"
            )
        raise TokenizerError(f"cannot train the {name} tokenizer with vocab_size={vocab_size}: {reason}") from None
    return spm.SentencePieceProcessor(model_proto=writer.getvalue())


SENTENCEPIECE_MAX_BYTES = 256 * 2**20  # read no further: a received file may be huge, or endless


def read_sentencepiece(path: Path, *, called: str) -> spm.SentencePieceProcessor:
    """The sentencepiece model in `path`, or a TokenizerError that names the file (`called`: what an
    unreadable file is called in the message, "tokenizer model" or "sentencepiece model")."""
    if path.exists() and not path.is_file():  # a device (a received run's link to /dev/zero), a pipe: never read
        raise TokenizerError(f"{called} {path} is not a regular file")
    try:
        proto = read_at_most(path, SENTENCEPIECE_MAX_BYTES)
    except OSError as error:
        raise TokenizerError(f"cannot read {called} {path}: {error.strerror or error}") from None
    if proto is None:
        raise TokenizerError(
            f"{path}: over {SENTENCEPIECE_MAX_BYTES // 2**20} MiB, not a sentencepiece model (one of a million pieces "
            "takes tens of MiB)"
        )
    if not proto:  # sentencepiece takes empty bytes for "no model" and fails at the first use instead
        raise TokenizerError(f"{path} is empty: not a valid sentencepiece model (corrupt or truncated)")
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError:
        raise TokenizerError(f"{path} is not a valid sentencepiece model (corrupt or truncated)") from None


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    model = read_sentencepiece(path, called="tokenizer model")
    absent = [name for name, i in zip(SPECIAL_NAMES, _special_ids(model), strict=True) if i < 0]
    if absent:
        # Marian's (OPUS-MT's) sentencepiece files have no bos piece: their model comes whole through import-hf
        marian = "; a Marian (OPUS-MT) model's file has no bos: `tformer import-hf` imports that model whole"
        marian = marian if "bos" in absent else ""
        raise TokenizerError(
            f"{path} has no {'/'.join(absent)} piece ({', '.join(f'{name}_id=-1' for name in absent)}); tformer needs "
            f"pad, bos, eos and unk: retrain it with --pad_id={PAD_ID} --bos_id={BOS_ID} --eos_id={EOS_ID} "
            f"--unk_id={UNK_ID}, or leave out the tokenizer directory and let tformer train one{marian}"
        )
    return model


def _splits_at_spaces(model: spm.SentencePieceProcessor) -> bool:
    """Whether no piece of `model` can span a space: every piece holding the whitespace marker starts with
    it (none has it inside or at its end, as split_by_whitespace=false or treat_whitespace_as_suffix would
    give), and the marker alone is a piece (else a run of unknown characters around a space is one <unk>).
    Then sentencepiece (BPE and unigram alike) splits a text into the pieces of its words, each on its
    own. Unused pieces count too: BPE may build one on the way and split it up afterwards."""
    if model.piece_to_id(MARKER) == model.unk_id():
        return False
    special = (model.is_control, model.is_unknown, model.is_byte)
    return not any(
        MARKER in model.id_to_piece(index)[1:] and not any(test(index) for test in special)
        for index in range(model.get_piece_size())
    )


def _special_ids(model: spm.SentencePieceProcessor) -> tuple[int, int, int, int]:
    return model.pad_id(), model.bos_id(), model.eos_id(), model.unk_id()


def _named_ids(model: spm.SentencePieceProcessor) -> str:
    return ", ".join(f"{name}_id={i}" for name, i in zip(SPECIAL_NAMES, _special_ids(model), strict=True))
