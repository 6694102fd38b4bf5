"""`tformer translate`'s input reader: a chunk is whatever lines are ready, so a pipe gets its answers
line by line instead of after 256 lines or the end of input."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tformer.cli.line_input import ready_chunks
from tformer.cli.main import main


def next_chunk_within(chunks, seconds: float = 10.0) -> list[str]:
    """The next chunk, failing (instead of hanging the suite) if it does not come in time."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(next(chunks)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, "no chunk arrived although complete lines were ready"
    return box[0]


def test_ready_lines_come_out_before_the_writer_closes_the_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        chunks = ready_chunks(read_end, max_lines=256)
        first = "ein Satz\r\nzwei\nsch\u00f6n".encode()
        os.write(write_end, first[:-2])  # the line "schön" cut inside its two-byte "ö"
        assert next_chunk_within(chunks) == ["ein Satz", "zwei"]
        os.write(write_end, first[-2:] + b"e Zeile\nvier\n")
        assert next_chunk_within(chunks) == ["sch\u00f6ne Zeile", "vier"]
        os.write(write_end, b"ohne Zeilenende")
        os.close(write_end)
        write_end = -1
        assert next_chunk_within(chunks) == ["ohne Zeilenende"]
        assert list(chunks) == []
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_file_is_read_in_full_chunks_of_at_most_max_lines(tmp_path: Path) -> None:
    path = tmp_path / "input.txt"
    path.write_text("".join(f"line {i}\n" for i in range(7)) + "\n", encoding="utf-8")
    with open(path, "rb") as source:
        chunks = list(ready_chunks(source.fileno(), max_lines=3))
    assert [len(chunk) for chunk in chunks] == [3, 3, 2]
    assert chunks[-1] == ["line 6", ""]


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("gut\nschön\n".encode("latin-1"))
    with open(path, "rb") as source, pytest.raises(ValueError, match="input line 2 is not valid UTF-8"):
        list(ready_chunks(source.fileno(), max_lines=10))


def test_utf16_input_is_refused_not_translated_as_text_with_nuls(tmp_path: Path) -> None:
    """UTF-16 without a byte-order mark decodes as valid UTF-8 with a NUL beside every letter: it was
    translated as that garbage."""
    path = tmp_path / "utf16.txt"
    path.write_bytes("hello\nworld\n".encode("utf-16-le"))
    with open(path, "rb") as source, pytest.raises(ValueError, match=r"input line 1 holds a NUL byte.*UTF-16"):
        list(ready_chunks(source.fileno(), max_lines=10))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_input_beyond_ascii_is_named_as_utf16(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "utf16.txt"
    path.write_bytes("Äpfel\nMänner\n".encode(encoding))
    with open(path, "rb") as source, pytest.raises(ValueError, match=r"input line 1 .*looks like UTF-16.*iconv"):
        list(ready_chunks(source.fileno(), max_lines=10))


def test_translate_refuses_to_write_over_its_input_and_leaves_it_alone(tmp_path: Path, capsys) -> None:
    text = tmp_path / "same.txt"
    text.write_text("a sentence\n", encoding="utf-8")
    assert main(["translate", str(tmp_path / "no-run"), "--input", str(text), "--output", str(text)]) == 2
    assert "is the --input file" in capsys.readouterr().err
    assert text.read_text(encoding="utf-8") == "a sentence\n"


@pytest.mark.parametrize("device", ["foo", "mps"])
def test_translate_refuses_an_unknown_device_in_one_line(tmp_path: Path, capsys, device: str) -> None:
    assert main(["translate", str(tmp_path / "no-run"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device") and len(err.strip().splitlines()) == 1


def test_translate_with_standard_input_closed_says_so_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """`tformer translate RUN <&-` leaves sys.stdin None (it crashed in a loop over None)."""
    from tformer.cli import translate

    monkeypatch.setattr("sys.stdin", None)
    with pytest.raises(ValueError, match="there is no standard input"):
        translate._translations(object(), None)


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["translate", "{run}"], "--output"),
        (["align", "{run}", "--src", "{run}", "--tgt", "{run}"], "--out"),
        (["info", "--preset", "tiny"], None),  # info, evaluate and explain printed nothing, with exit status 0
        (["evaluate", "{run}", "--src", "{run}", "--ref", "{run}"], None),
        (["explain"], None),
    ],
)
def test_a_command_that_writes_to_standard_output_closed_says_so_in_one_line(
    tmp_path: Path, monkeypatch, capsys, command: list[str], flag: str | None
) -> None:
    """`tformer translate RUN >&-` leaves sys.stdout None: translate and align crashed on it (an
    AttributeError traceback) once the work was done; they now refuse before loading anything."""
    monkeypatch.setattr("sys.stdout", None)
    assert main([part.format(run=tmp_path / "no-run") for part in command]) == 2
    err = capsys.readouterr().err
    advice = f"give {flag} FILE, or redirect" if flag else f"redirect tformer {command[0]}'s output"
    assert err.startswith(f"error: there is no standard output: {advice}") and err.count("\n") == 1


def test_a_byte_order_mark_at_the_start_of_the_input_is_dropped(tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with U+FEFF; the corpus reader drops it from training text, so
    `tformer translate --input` must too (kept, it made the first word an unknown piece)."""
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffthe cat\r\n\ufeffkept inside\n".encode())
    with open(path, "rb") as source, pytest.warns(UserWarning, match="^input line 2 starts with a byte-order mark"):
        assert list(ready_chunks(source.fileno(), max_lines=10)) == [["the cat", "\ufeffkept inside"]]
    path.write_bytes("\ufeffno newline".encode())
    with open(path, "rb") as source:
        assert list(ready_chunks(source.fileno(), max_lines=10)) == [["no newline"]]


def test_byte_order_marks_starting_later_lines_are_warned_of_once(tmp_path: Path, capsys) -> None:
    """Inputs joined with `cat`, each starting with a byte-order mark: the marks after the first line are
    translated as part of their line's first word, as training text keeps them; one warning says so."""
    path = tmp_path / "joined.txt"
    path.write_bytes("\ufeffone\ntwo\n\ufeffthree\n\ufefffour".encode())
    with open(path, "rb") as source, pytest.warns(UserWarning) as caught:
        assert list(ready_chunks(source.fileno(), max_lines=2)) == [["one", "two"], ["\ufeffthree", "\ufefffour"]]
    assert [str(warning.message) for warning in caught] == [
        "input line 3 starts with a byte-order mark (U+FEFF), as where files that each begin with one were joined; "
        "it is translated as part of the line's first word (not said again for later lines). Remove them: "
        "sed 's/^\\xEF\\xBB\\xBF//' FILE"
    ]
    path.write_bytes("one\n\ufefftwo".encode())  # the last line, without its newline
    with open(path, "rb") as source, pytest.warns(UserWarning, match="^input line 2 starts with a byte-order mark"):
        assert list(ready_chunks(source.fileno(), max_lines=2)) == [["one", "\ufefftwo"]]


def test_gzip_input_is_refused_with_advice_to_decompress(tmp_path: Path) -> None:
    """evaluate, align and train read .gz files; translate's reader said 'not valid UTF-8 ... iconv'."""
    import gzip

    path = tmp_path / "test.en.gz"
    path.write_bytes(gzip.compress(b"a sentence\n"))
    with open(path, "rb") as source, pytest.raises(ValueError, match=r"^the input is gzip-compressed: .*zcat"):
        list(ready_chunks(source.fileno(), max_lines=10))


def test_a_long_line_is_read_without_copying_its_start_at_every_read(tmp_path: Path, monkeypatch) -> None:
    """The start of a line still without its newline was joined to each read (`pending + data`) and split
    again, so reading one long line copied it once per read, quadratic in its length: a 20 MB line (a file
    whose lines end in CR alone, minified text) took 2.9 s to read, and 200 MB would take minutes before its
    one-line refusal. Each read here is a bytes object that counts the bytes joined in front of it: a line of
    1 MB read 4 kB at a time (256 reads) had about 128 MB joined before; now nothing is."""
    import tformer.cli.line_input as line_input

    joined = []

    class CountedRead(bytes):
        def __radd__(self, start: bytes) -> bytes:  # `start + read`, the start being a plain bytes object
            joined.append(len(start))
            return bytes(start) + bytes(self)

    real_read = line_input.os.read
    monkeypatch.setattr(line_input, "READ_BYTES", 4096)
    monkeypatch.setattr(line_input.os, "read", lambda fd, n: CountedRead(real_read(fd, n)))
    path = tmp_path / "one-long-line.txt"
    path.write_bytes(b"hello dog " * 100_000 + b"\nnext\n")
    with open(path, "rb") as source:
        chunks = list(ready_chunks(source.fileno(), max_lines=10))
    assert [len(line) for chunk in chunks for line in chunk] == [1_000_000, 4]
    assert sum(joined) < 2_000_000, f"{sum(joined):,} bytes joined to read a line of 1,000,000"
