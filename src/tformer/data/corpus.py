"""Reading and validating parallel text: aligned plain-text files, TSV, or one monolingual file.

Every problem a user can cause (missing file, bad UTF-8, misaligned files, a malformed TSV line) is a
one-line `CorpusError` that names the file and, where it helps, the line number and counts. Pairs that
are unusable for training (an empty side, or a side over `max_chars`) are skipped and counted in a
`CorpusReport` so that the user sees how much data was dropped; `strict=True` turns them into errors.

Gzip is recognised by its magic bytes, not the `.gz` suffix: a compressed file saved under a plain
name, or a file someone gunzipped but did not rename, still reads correctly, and no behaviour is
inferred from file names. Files are read whole; this suits corpora of up to a few hundred megabytes.

Lines are split on "\\n" only (never `str.splitlines`, which also splits on U+2028, U+0085 and other
separators that occur inside real sentences and would silently misalign the two sides), then stripped
(so CRLF ends read as LF ends). A file whose lines end in CR alone (even with one final newline) is
refused: read so, it is one line.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
BOM = "\ufeff"  # a byte-order mark: an encoding artefact, not text
SPACE_MARKER = "\u2581"  # sentencepiece's whitespace marker: tformer.data.tokenizer.normalize makes it a space
# why a NUL byte in text is refused: UTF-16 text decodes as "valid" UTF-8 with a NUL in every other byte
NUL_BYTE_ADVICE = "looks like UTF-16 or binary data, not UTF-8 text; convert it (e.g. iconv -f UTF-16 -t UTF-8)"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# a byte-order mark starting a later line: what joining files that each begin with one leaves, and its fix
JOINED_BOM = "starts with a byte-order mark (U+FEFF), as where files that each begin with one were joined"
REMOVE_BOMS = "sed 's/^\\xEF\\xBB\\xBF//'"


def check_no_nul(
    text: str, name: str, *, advice: str = NUL_BYTE_ADVICE, error: Callable[[str], Exception] = ValueError
) -> None:
    """Refuse `text` (`name`: "input line 3", "sentence 2") holding a NUL character: it is what UTF-16 text or
    binary data read as UTF-8 gives, never a sentence (training data cannot hold one either). `advice` says
    what to do; `error` makes the exception from the message (a ValueError by default)."""
    if "\x00" in text:
        raise error(f"{name} holds a NUL character (U+0000): it {advice}")


def looks_like_utf16(data: bytes, error: UnicodeDecodeError) -> bool:
    """Whether bytes that are not UTF-8 are UTF-16 (what Windows editors save as "Unicode"): a UTF-16
    byte-order mark, or a NUL beside the first invalid byte, as every ASCII letter of UTF-16 has."""
    return data.startswith(UTF16_BOMS) or b"\x00" in data[: error.start + 2]


class CorpusError(ValueError):
    """The text a user supplied cannot be read as asked; the message names the file and line."""


@dataclass(frozen=True)
class CorpusReport:
    """How many lines were read, kept and skipped (and why), so data loss is never silent."""

    total_lines: int
    kept: int
    skipped_empty: int
    skipped_long: int

    def summary(self) -> str:
        skipped = self.skipped_empty + self.skipped_long
        if skipped == 0:
            return f"kept all {self.kept} pairs"
        return (
            f"kept {self.kept} of {self.total_lines} pairs "
            f"(skipped {self.skipped_empty} with an empty side, {self.skipped_long} over the length limit)"
        )


@dataclass(frozen=True)
class ParallelCorpus:
    """Aligned sentence pairs: `sources[i]` translates to `targets[i]`."""

    sources: list[str]
    targets: list[str]
    report: CorpusReport

    def __len__(self) -> int:
        return len(self.sources)


def read_text(path: str | Path) -> str:
    """The whole file as text: gunzipped if it starts with the gzip magic bytes, decoded as UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"expected a file but got a directory: {path}") from None
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror or error}") from None
    gzipped = data.startswith(GZIP_MAGIC)
    if gzipped:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise CorpusError(f"{path}: corrupt gzip data ({error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        if looks_like_utf16(data, error):
            raise CorpusError(f"{path}:{line}: invalid UTF-8: the file {NUL_BYTE_ADVICE}") from None
        raise CorpusError(f"{path}:{line}: invalid UTF-8 ({error.reason}); re-encode the file as UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise CorpusError(f"{path}:{line}: a NUL byte: the file {NUL_BYTE_ADVICE}")
    if _lines_end_in_cr(text):  # else read as one line, holding the whole file (or most of it)
        raise CorpusError(
            f"{path}: lines end in a carriage return alone (classic Mac OS, Excel's 'CSV (Macintosh)'), not "
            f"a newline; convert them, e.g. tr '\\r' '\\n' < {path} > FIXED"
        )
    _warn_of_inner_boms(path, text, gzipped=gzipped)
    return text.removeprefix(BOM)


def _lines_end_in_cr(text: str) -> bool:
    """Whether the lines of `text` end in a carriage return alone: it has no newline but a CR inside, or more
    lone CRs than newlines, as a classic Mac OS file given one final newline (`echo >> FILE`, an editor's
    "insert final newline") has. A stray CR inside a line of a LF or CRLF file is not enough."""
    if "\r" not in text:
        return False
    if "\n" not in text:
        return "\r" in text.rstrip("\r")
    newlines = text.count("\n")
    return text.count("\r") - text.count("\r\n") > newlines


def _warn_of_inner_boms(path: Path, text: str, *, gzipped: bool) -> None:
    """Warn of lines, after the first, that start with a byte-order mark: files that each begin with one,
    joined with `cat`. It is kept (tokenizers trained on such text have a piece for it, and dropping it
    would change how they split text), so it stays glued to the line's first word: say how to remove it."""
    index = text.find("\n" + BOM)
    if index == -1:
        return
    line = text.count("\n", 0, index) + 2
    count = text.count("\n" + BOM)
    others = f" (and {count - 1} more line{'s' if count > 2 else ''})" if count > 1 else ""
    remove = f"zcat {path} | {REMOVE_BOMS} | gzip > FIXED.gz" if gzipped else f"{REMOVE_BOMS} {path} > FIXED"
    warnings.warn(
        f"{path}:{line}{others}: {JOINED_BOM}; it is read as part of the line's first word. Remove them: {remove}",
        UserWarning,
        stacklevel=3,
    )


def split_lines(text: str) -> list[str]:
    """Lines split on "\\n" only and stripped; a final newline does not add an empty line."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """One stripped string per line of a monolingual file (kept even when empty, so outputs align)."""
    return split_lines(read_text(path))


def read_parallel(
    src_path: str | Path, tgt_path: str | Path, *, max_chars: int = 2000, strict: bool = False
) -> ParallelCorpus:
    """Pairs from two aligned files (line i of one translates line i of the other)."""
    _check_max_chars(max_chars)
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise CorpusError(
            f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}; the files must be aligned"
        )
    locations = ((f"{src_path}:{i}", f"{tgt_path}:{i}") for i in range(1, len(sources) + 1))
    return _filter_pairs(
        zip(sources, targets, locations, strict=True), len(sources), max_chars, strict, f"{src_path} + {tgt_path}"
    )


def read_tsv(path: str | Path, *, max_chars: int = 2000, strict: bool = False) -> ParallelCorpus:
    """Pairs from one file of `source<TAB>target` lines; a wholly blank line counts as an empty pair."""
    _check_max_chars(max_chars)
    raw_lines = read_text(path).split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    rows: list[tuple[str, str, tuple[str, str]]] = []
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{number}"
        if raw.strip() == "":
            rows.append(("", "", (where, where)))
            continue
        tabs = raw.count("\t")
        if tabs != 1:
            raise CorpusError(f"{where}: expected exactly one tab between source and target, found {tabs}")
        source, target = raw.split("\t")
        rows.append((source.strip(), target.strip(), (where, where)))
    return _filter_pairs(rows, len(raw_lines), max_chars, strict, path)


def _filter_pairs(
    rows: Iterable[tuple[str, str, tuple[str, str]]],
    total: int,
    max_chars: int,
    strict: bool,
    name: str | Path,
) -> ParallelCorpus:
    """Keep usable pairs; count (or, when strict, reject) empty and over-long ones."""
    sources: list[str] = []
    targets: list[str] = []
    skipped_empty = skipped_long = 0
    for source, target, (src_where, tgt_where) in rows:
        if _blank(source) or _blank(target):
            if strict:
                side = src_where if _blank(source) else tgt_where
                raise CorpusError(
                    f"{side}: empty sentence (data.strict = true); remove the pair, or set data.strict = false "
                    "to skip such pairs"
                )
            skipped_empty += 1
        elif len(source) > max_chars or len(target) > max_chars:
            if strict:
                side, n = (src_where, len(source)) if len(source) > max_chars else (tgt_where, len(target))
                raise CorpusError(
                    f"{side}: sentence of {n} characters exceeds data.max_chars={max_chars} (data.strict = true); "
                    "raise data.max_chars, or set data.strict = false to skip such pairs"
                )
            skipped_long += 1
        else:
            sources.append(source)
            targets.append(target)
    if not sources:
        raise CorpusError(
            f"{name}: no usable pairs out of {total} lines "
            f"({skipped_empty} with an empty side, {skipped_long} over {max_chars} characters)"
        )
    report = CorpusReport(total, len(sources), skipped_empty, skipped_long)
    return ParallelCorpus(sources, targets, report)


def _blank(line: str) -> bool:
    """Whether a stripped line is empty as the tokenizer sees it: nothing, or only whitespace and U+2581 (the
    space marker of sentencepiece, which tokenizer.normalize makes a space), which encodes to no piece at all.
    Only a line that starts with the marker pays for more than a look at its first character."""
    return not line or (line[0] == SPACE_MARKER and not line.replace(SPACE_MARKER, " ").strip())


def _check_max_chars(max_chars: int) -> None:
    if max_chars < 1:
        raise CorpusError(f"max_chars must be at least 1, got {max_chars}")


def file_digest(path: str | Path) -> str:
    """BLAKE2b of a file's bytes (hex): whether two copies of a corpus, or one file at two times, are the same."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()
