"""Marian's tokenizer files (source.spm, target.spm, vocab.json) behind tformer's Tokenizer interface.

A Marian (OPUS-MT) checkpoint segments text with two sentencepiece models, one per language, but its
token ids are not the sentencepiece ids: `vocab.json` maps each piece to the model's id (one joint
vocabulary for both sides, or `target_vocab.json` for the target side when `separate_vocabs`). Its
special ids differ from tformer's too: typically eos = 0, unk = 1, pad = the last id, and decoding
starts from pad. `VocabTokenizer` is that arrangement: it has the methods of `tformer.data.tokenizer.Tokenizer`
that inference uses, and takes its special ids from the files, never from tformer's constants.

Encoding follows `transformers.MarianTokenizer` exactly: a leading language code `>>xx<<` is one token,
the rest is segmented by the sentencepiece model (which applies its own normalisation rule), and a
piece missing from the vocabulary becomes unk. Unlike tformer's own Tokenizer there is no Python-side
`normalize()` step.

In a checkpoint's tokenizer directory the files keep Marian's names, plus `vocab_tokenizer.json`
(special ids and the kind marker that `load_tokenizer` looks for).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from tformer.data.tokenizer import Tokenizer, TokenizerError, read_sentencepiece, refuse_surrogates

MARKER_FILE = "vocab_tokenizer.json"
SOURCE_SPM, TARGET_SPM = "source.spm", "target.spm"
VOCAB_FILE, TARGET_VOCAB_FILE = "vocab.json", "target_vocab.json"
KIND = "marian-vocab"


class VocabTokenizer:
    """Sentencepiece segmentation with a separate piece -> id table, as Marian checkpoints ship it."""

    def __init__(
        self,
        source: spm.SentencePieceProcessor,
        target: spm.SentencePieceProcessor,
        vocab: dict[str, int],
        target_vocab: dict[str, int] | None = None,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        unk_id: int,
    ) -> None:
        self._src, self._tgt = source, target
        self._src_vocab = vocab
        self._tgt_vocab = target_vocab if target_vocab is not None else vocab
        self._joint = target_vocab is None
        self._src_pieces = _inverse(vocab, "vocab.json")
        self._tgt_pieces = self._src_pieces if target_vocab is None else _inverse(target_vocab, TARGET_VOCAB_FILE)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if value not in self._tgt_pieces:
                raise TokenizerError(f"{name} id {value} is not in the target vocabulary")

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_marian_dir(cls, directory: str | Path, *, bos_id: int) -> VocabTokenizer:
        """Read a Hugging Face Marian directory; the special pieces are named by tokenizer_config.json
        (default `</s>`, `<unk>`, `<pad>`), `bos_id` is the model's decoder start id."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        settings = _read_json(config_path) if config_path.exists() else {}
        separate = bool(settings.get("separate_vocabs", False))
        vocab = _read_vocab(directory / VOCAB_FILE)
        target_vocab = _read_vocab(directory / TARGET_VOCAB_FILE) if separate else None
        ids = {}
        for name, default in (("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>")):
            piece = _token_text(settings.get(f"{name}_token", default))
            if piece not in vocab:
                raise TokenizerError(f"{directory / VOCAB_FILE} has no {name} token {piece!r}")
            ids[f"{name}_id"] = vocab[piece]
        target_file = directory / (TARGET_VOCAB_FILE if separate else VOCAB_FILE)
        if bos_id not in (target_vocab or vocab).values():
            raise TokenizerError(
                f"{directory}: the decoder start id {bos_id} (decoder_start_token_id in generation_config.json or "
                f"config.json) is not an id of {target_file.name}"
            )
        source = read_sentencepiece(directory / SOURCE_SPM, called="sentencepiece model")
        target = read_sentencepiece(directory / TARGET_SPM, called="sentencepiece model")
        return cls(source, target, vocab, target_vocab, bos_id=bos_id, **ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> VocabTokenizer:
        """tformer's own tokenizer in Marian's form: the same models, each piece keeping its id."""
        source = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto("source"))
        target = source
        if not tokenizer.joint:
            target = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto("target"))
        vocab = {piece: i for i, piece in enumerate(tokenizer.id_to_source_piece(range(tokenizer.src_vocab_size)))}
        target_vocab = None
        if not tokenizer.joint:
            pieces = tokenizer.id_to_target_piece(range(tokenizer.tgt_vocab_size))
            target_vocab = {piece: i for i, piece in enumerate(pieces)}
        ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, unk_id=tokenizer.unk_id)
        return cls(source, target, vocab, target_vocab, **ids)

    @classmethod
    def from_files(cls, directory: str | Path) -> VocabTokenizer:
        """Load what `to_files` wrote."""
        directory = Path(directory)
        marker = _read_json(directory / MARKER_FILE)
        if marker.get("kind") != KIND:
            raise TokenizerError(f"{directory / MARKER_FILE}: kind is {marker.get('kind')!r}, expected {KIND!r}")
        vocab = _read_vocab(directory / VOCAB_FILE)
        target_vocab = None if marker.get("joint", True) else _read_vocab(directory / TARGET_VOCAB_FILE)
        try:
            ids = {name: int(marker[name]) for name in ("bos_id", "eos_id", "pad_id", "unk_id")}
        except (KeyError, TypeError, ValueError):
            raise TokenizerError(f"{directory / MARKER_FILE}: missing or invalid special ids") from None
        source = read_sentencepiece(directory / SOURCE_SPM, called="sentencepiece model")
        target = read_sentencepiece(directory / TARGET_SPM, called="sentencepiece model")
        return cls(source, target, vocab, target_vocab, **ids)

    def to_files(self, directory: str | Path) -> list[Path]:
        """The Marian files, plus the marker that tells `load_tokenizer` which class reads them."""
        paths = self.write_marian_files(directory)
        marker = Path(directory) / MARKER_FILE
        ids = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, unk_id=self.unk_id)
        marker.write_text(json.dumps({"kind": KIND, "joint": self._joint, **ids}, indent=2) + "\n", encoding="utf-8")
        return [*paths, marker]

    def write_marian_files(self, directory: str | Path, *, model_max_length: int = 512) -> list[Path]:
        """source.spm, target.spm, vocab.json (and target_vocab.json) and a tokenizer_config.json that
        `transformers.MarianTokenizer.from_pretrained` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / SOURCE_SPM, directory / TARGET_SPM, directory / VOCAB_FILE]
        paths[0].write_bytes(self._src.serialized_model_proto())
        paths[1].write_bytes(self._tgt.serialized_model_proto())
        _write_json(paths[2], self._src_vocab)
        if not self._joint:
            paths.append(directory / TARGET_VOCAB_FILE)
            _write_json(paths[-1], self._tgt_vocab)
        settings: dict[str, Any] = {
            "tokenizer_class": "MarianTokenizer",
            "separate_vocabs": not self._joint,
            "model_max_length": model_max_length,
            "eos_token": self._tgt_pieces[self.eos_id],
            "unk_token": self._tgt_pieces[self.unk_id],
            "pad_token": self._tgt_pieces[self.pad_id],
        }
        if self.bos_id != self.pad_id:  # a real bos token: make it special, so decoding skips it
            settings["bos_token"] = self._tgt_pieces[self.bos_id]
        paths.append(directory / "tokenizer_config.json")
        _write_json(paths[-1], settings)
        return paths

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def joint(self) -> bool:
        return self._joint

    @property
    def src_vocab_size(self) -> int:
        return max(self._src_pieces) + 1

    @property
    def tgt_vocab_size(self) -> int:
        return max(self._tgt_pieces) + 1

    # ---- encoding and decoding ----------------------------------------------------------------------

    def encode_source(self, text: str) -> list[int]:
        return self._encode(self._src, self._src_vocab, text)

    def encode_target(self, text: str) -> list[int]:
        return self._encode(self._tgt, self._tgt_vocab, text)

    def encode_sources(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode_source(text) for text in texts]

    def encode_targets(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode_target(text) for text in texts]

    def decode_source(self, ids: Iterable[int]) -> str:
        return self._decode(self._src, self._src_pieces, ids)

    def decode_target(self, ids: Iterable[int]) -> str:
        """Text of the ids; pad, bos and eos are dropped wherever they occur. With a joint vocabulary
        the source model joins the pieces, as in `MarianTokenizer.decode`, so the texts agree."""
        return self._decode(self._src if self._joint else self._tgt, self._tgt_pieces, ids)

    def decode_targets(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode_target(ids) for ids in batch]

    def source_pieces(self, text: str) -> list[str]:
        return self.id_to_source_piece(self.encode_source(text))

    def target_pieces(self, text: str) -> list[str]:
        return self.id_to_target_piece(self.encode_target(text))

    def id_to_source_piece(self, ids: Iterable[int]) -> list[str]:
        return [self._src_pieces[i] for i in _checked(self._src_pieces, ids)]

    def id_to_target_piece(self, ids: Iterable[int]) -> list[str]:
        return [self._tgt_pieces[i] for i in _checked(self._tgt_pieces, ids)]

    def fingerprint(self) -> int:
        """A CRC-32 of the sentencepiece models, the id tables and the special ids: equal for tokenizers
        that turn every text into the same ids."""
        checksum = zlib.crc32(self._src.serialized_model_proto())
        checksum = zlib.crc32(self._tgt.serialized_model_proto(), checksum)
        tables = [sorted(self._src_vocab.items()), sorted(self._tgt_vocab.items())]
        specials = [self.bos_id, self.eos_id, self.pad_id, self.unk_id]
        return zlib.crc32(json.dumps([tables, specials]).encode(), checksum)

    def _encode(self, model: spm.SentencePieceProcessor, vocab: dict[str, int], text: str) -> list[int]:
        refuse_surrogates(text)
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # a target-language code, as Marian
            code, text = [text[: end + 2]], text[end + 2 :]
        return [vocab.get(piece, self.unk_id) for piece in [*code, *model.encode(text, out_type=str)]]

    def _decode(self, model: spm.SentencePieceProcessor, pieces: dict[int, str], ids: Iterable[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        text = model.decode_pieces([pieces[i] for i in _checked(pieces, ids) if i not in skip])
        return text.replace("\u2581", " ").strip()  # pieces the model does not know keep their marker

    def __repr__(self) -> str:
        kind = "joint" if self._joint else "separate"
        return f"VocabTokenizer({kind}, src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size})"


def _checked(pieces: dict[int, str], ids: Iterable[int]) -> list[int]:
    values = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
    bad = [i for i in values if i not in pieces]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is not in the vocabulary")
    return values


def _inverse(vocab: dict[str, int], name: str) -> dict[int, str]:
    pieces = {index: piece for piece, index in vocab.items()}
    if len(pieces) != len(vocab):
        raise TokenizerError(f"{name} maps two pieces to the same id")
    return pieces


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"missing tokenizer file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested deep
        raise TokenizerError(f"{path}: unreadable or corrupt ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return document


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not all(isinstance(index, int) and index >= 0 for index in vocab.values()):
        raise TokenizerError(f"{path}: every value must be a non-negative integer id")
    return vocab


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
