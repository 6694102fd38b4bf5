"""Lines of UTF-8 text from a file descriptor, in chunks of whatever is ready: translate them now, not
after `chunk_lines` more lines or the end of input.

A fixed chunk (read 1,024 lines, then translate) makes `tformer translate` useless as an interactive
filter: a line typed or sent through a pipe waits for 1,023 more. Here a chunk ends when no more input is
ready (checked with select, without blocking) or when it holds `max_lines`; a file, always ready, gives
full chunks. Bytes are read from the descriptor directly (a buffered text stream could hold lines that
select cannot see), split on newlines and decoded strictly, so invalid UTF-8 is reported with its line.
A UTF-8 byte-order mark at the start of the input (as Windows editors write) is dropped, as the corpus
reader drops it from training text: it is an encoding artefact, and if kept it would make the first
line's first word an unknown piece and change its translation. One at the start of a later line (files
that each begin with one, joined with `cat`) is kept, as the corpus reader keeps it, with a warning that
says how to remove it. Gzip-compressed input is refused with
advice to decompress it (the corpus reader, which reads whole files, takes it as it is).
"""

from __future__ import annotations

import os
import select
import warnings
from collections.abc import Iterator

from tformer.data.corpus import BOM, GZIP_MAGIC, JOINED_BOM, NUL_BYTE_ADVICE, REMOVE_BOMS, looks_like_utf16

READ_BYTES = 1 << 16


def ready_chunks(fd: int, max_lines: int) -> Iterator[list[str]]:
    """Chunks of at most `max_lines` lines (without their line ends) read from `fd`, each yielded as soon
    as the input has no further line ready; the last line may lack its newline."""
    lines: list[str] = []
    pending = bytearray()  # the start of a line whose newline has not arrived (grown in place: a long line
    # joined to each read and split again was copied once per read, quadratic in its length)
    number = 0  # lines decoded so far
    at_end = False
    warned = False  # of a byte-order mark inside the input: once is enough
    while not at_end or lines:
        # read while there is room; block for input only while there is nothing to translate
        if not at_end and len(lines) < max_lines and select.select([fd], [], [], None if not lines else 0)[0]:
            data = os.read(fd, READ_BYTES)
            if data:
                complete = _complete_lines(pending, data)
                for raw in complete:
                    number += 1
                    lines.append(_decoded(raw, number))
                    warned = warned or _warned_of_bom(lines[-1], number)
                continue
            at_end = True
            if pending:
                lines.append(_decoded(bytes(pending), number + 1))
                warned = warned or _warned_of_bom(lines[-1], number + 1)
        if lines:
            yield lines[:max_lines]
            del lines[:max_lines]


def _complete_lines(pending: bytearray, data: bytes) -> list[bytes]:
    """The lines that `data` completes, the first of them starting with `pending`; `pending` is left holding
    the start of the next line. Only `data` is searched for newlines, so a long line costs its length."""
    *complete, rest = data.split(b"\n")
    if complete:
        complete[0] = bytes(pending + complete[0])
        pending.clear()
    pending += rest
    return complete


def _warned_of_bom(line: str, number: int) -> bool:
    """Warn, and say so, if a line after the first starts with a byte-order mark (files that each begin with
    one, joined with `cat`): it is kept, as the corpus reader keeps it in training text, and read as part of
    the line's first word."""
    if not line.startswith(BOM):
        return False
    warnings.warn(
        f"input line {number} {JOINED_BOM}; it is translated as part of the line's first word (not said again for "
        f"later lines). Remove them: {REMOVE_BOMS} FILE",
        UserWarning,
        stacklevel=2,
    )
    return True


def _decoded(raw: bytes, number: int) -> str:
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError as error:
        if number == 1 and raw.startswith(GZIP_MAGIC):
            raise ValueError(
                "the input is gzip-compressed: decompress it first, e.g. zcat FILE.gz | tformer translate RUN_DIR"
            ) from None
        if looks_like_utf16(raw, error):
            raise ValueError(f"input line {number} is not valid UTF-8: the input {NUL_BYTE_ADVICE}") from None
        raise ValueError(
            f"input line {number} is not valid UTF-8 (byte {error.start + 1}: {raw[error.start : error.start + 1]!r}); "
            "convert the input to UTF-8 (e.g. with iconv)"
        ) from None
    if "\x00" in text:
        raise ValueError(f"input line {number} holds a NUL byte: the input {NUL_BYTE_ADVICE}")
    return text.removeprefix(BOM) if number == 1 else text
