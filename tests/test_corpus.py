"""Reading parallel text: alignment, gzip by content, UTF-8 errors with line numbers, skip accounting."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import pytest

from tformer.data.corpus import CorpusError, CorpusReport, read_lines, read_parallel, read_tsv


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_reads_aligned_files_and_strips_lines(tmp_path: Path) -> None:
    src = write(tmp_path / "a.en", ["  Hello world ", "Two\tmen\r"])
    tgt = write(tmp_path / "a.de", ["Hallo Welt", " Zwei Männer"])
    corpus = read_parallel(src, tgt)
    assert corpus.sources == ["Hello world", "Two\tmen"]
    assert corpus.targets == ["Hallo Welt", "Zwei Männer"]
    assert len(corpus) == 2
    assert corpus.report == CorpusReport(total_lines=2, kept=2, skipped_empty=0, skipped_long=0)
    assert corpus.report.summary() == "kept all 2 pairs"


def test_gzip_is_recognised_by_content_not_suffix(tmp_path: Path) -> None:
    plain = write(tmp_path / "b.de", ["eins", "zwei"])
    compressed = tmp_path / "b.en"  # gzip data under a name without .gz
    compressed.write_bytes(gzip.compress(b"one\ntwo\n"))
    corpus = read_parallel(compressed, plain)
    assert corpus.sources == ["one", "two"]
    assert read_lines(compressed) == ["one", "two"]


def test_unicode_line_separators_do_not_split_lines(tmp_path: Path) -> None:
    src = write(tmp_path / "c.en", ["a\u2028b", "c\x85d"])
    tgt = write(tmp_path / "c.de", ["x", "y"])
    assert read_parallel(src, tgt).sources == ["a\u2028b", "c\x85d"]


def test_byte_order_mark_and_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufefffirst\nsecond".encode())
    assert read_lines(path) == ["first", "second"]


def test_byte_order_marks_starting_later_lines_are_kept_with_a_warning_saying_how_to_remove_them(
    tmp_path: Path,
) -> None:
    """`cat a.txt b.txt`, each starting with a byte-order mark, leaves one at the start of b's first line,
    where it was read as part of that line's first word (its own piece, or <unk>). It is kept (normalize
    keeps U+FEFF, and a tokenizer trained on such text has a piece for it: dropping it would change how
    saved tokenizers split text), with a warning that names the line and the fix."""
    path = tmp_path / "joined.txt"
    path.write_bytes("\ufefffirst\nsecond\n\ufeffthird\nfourth \ufeffinside\n\ufefffifth\r\n\ufeffsixth".encode())
    with pytest.warns(UserWarning) as caught:
        assert read_lines(path) == [
            "first",
            "second",
            "\ufeffthird",
            "fourth \ufeffinside",
            "\ufefffifth",
            "\ufeffsixth",
        ]
    (warning,) = caught
    assert str(warning.message) == (
        f"{path}:3 (and 2 more lines): starts with a byte-order mark (U+FEFF), as where files that each begin with "
        "one were joined; it is read as part of the line's first word. Remove them: "
        f"sed 's/^\\xEF\\xBB\\xBF//' {path} > FIXED"
    )
    compressed = tmp_path / "joined.gz"
    compressed.write_bytes(gzip.compress("a\n\ufeffb\n".encode()))
    with pytest.warns(UserWarning, match=r"^\S+joined\.gz:2: starts with .* Remove them: zcat \S+joined\.gz \| sed "):
        read_lines(compressed)
    for text in ("\ufefffirst\nsecond\n", "first \ufeff\nsecond\ufeff\n"):  # the file's own, or inside lines
        path.write_bytes(text.encode())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read_lines(path)


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "d.en", ["a", "b", "c"])
    tgt = write(tmp_path / "d.de", ["x", "y"])
    with pytest.raises(CorpusError, match=r"d\.en has 3 lines but .*d\.de has 2"):
        read_parallel(src, tgt)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.en"
    path.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(CorpusError, match=r"bad\.en:3: invalid UTF-8"):
        read_lines(path)


def test_utf16_or_binary_files_are_refused_naming_the_line(tmp_path: Path) -> None:
    """UTF-16 text without a byte-order mark decodes as valid UTF-8 with NULs between the letters, and
    trained as that; a NUL byte now stops the reader at the first line that holds one."""
    path = tmp_path / "utf16.en"
    path.write_bytes("one\ntwo\n".encode("utf-16-le"))
    with pytest.raises(CorpusError, match=r"utf16\.en:1: a NUL byte: the file looks like UTF-16"):
        read_lines(path)
    binary = tmp_path / "mixed.en"
    binary.write_bytes(b"text\nmore text\nbad\x00line\n")
    with pytest.raises(CorpusError, match=r"mixed\.en:3: a NUL byte"):
        read_lines(binary)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_text_beyond_ascii_is_named_as_utf16(tmp_path: Path, encoding: str) -> None:
    """What Windows editors save as "Unicode": with a byte-order mark, or with letters beyond ASCII, UTF-16
    is invalid UTF-8 before any NUL is seen, and the advice must still name the encoding to convert from."""
    path = tmp_path / "utf16.de"
    path.write_bytes("Männer\nÄpfel\n".encode(encoding))
    with pytest.raises(CorpusError, match=r"utf16\.de:1: .*looks like UTF-16.*iconv -f UTF-16 -t UTF-8"):
        read_lines(path)


def test_lines_ended_by_carriage_returns_alone_are_refused(tmp_path: Path) -> None:
    """Classic Mac OS line ends (what Excel for Mac still writes as "CSV (Macintosh)"): the whole file was
    one line, so two such files of short sentences trained on a single pair, "kept all 1 pairs"."""
    src, tgt = tmp_path / "mac.en", tmp_path / "mac.de"
    src.write_bytes(b"one\rtwo\rthree\r")
    tgt.write_bytes(b"eins\rzwei\rdrei\r")
    with pytest.raises(CorpusError, match=r"mac\.en: lines end in a carriage return alone .*tr '\\r' '\\n'"):
        read_parallel(src, tgt)
    # the same with one final newline (`echo >> FILE`, an editor's "insert final newline"): still one line
    (tmp_path / "mac_lf.en").write_bytes(b"one\rtwo\rthree\n")
    with pytest.raises(CorpusError, match=r"mac_lf\.en: lines end in a carriage return alone"):
        read_lines(tmp_path / "mac_lf.en")
    (tmp_path / "stray.en").write_bytes(b"one\r\ntw\ro\r\nthree\n")  # a stray CR in a CRLF file: kept in its line
    assert read_lines(tmp_path / "stray.en") == ["one", "tw\ro", "three"]
    (tmp_path / "stray_crlf.en").write_bytes(b"one\r\ntw\ro\r\nthree\r\n")  # every line CRLF, one stray CR
    assert read_lines(tmp_path / "stray_crlf.en") == ["one", "tw\ro", "three"]
    one_line = write(tmp_path / "one.en", ["a line\r"])  # CRLF, and a lone CR at a line's end: fine
    assert read_lines(one_line) == ["a line"]
    (tmp_path / "single.en").write_bytes(b"a single line ended by CR\r")
    assert read_lines(tmp_path / "single.en") == ["a single line ended by CR"]


def test_missing_file_and_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"file not found: .*nope\.en"):
        read_lines(tmp_path / "nope.en")
    with pytest.raises(CorpusError, match="directory"):
        read_lines(tmp_path)


def test_corrupt_gzip_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "trunc.gz"
    path.write_bytes(gzip.compress(b"some text\n" * 50)[:20])
    with pytest.raises(CorpusError, match="corrupt gzip"):
        read_lines(path)


def test_empty_and_long_pairs_are_skipped_and_counted(tmp_path: Path) -> None:
    src = write(tmp_path / "e.en", ["keep", "", "x" * 11, "ok", "fine"])
    tgt = write(tmp_path / "e.de", ["behalten", "leer", "kurz", "  ", "gut"])
    corpus = read_parallel(src, tgt, max_chars=10)
    assert corpus.sources == ["keep", "fine"]
    assert corpus.report == CorpusReport(total_lines=5, kept=2, skipped_empty=2, skipped_long=1)
    assert "kept 2 of 5" in corpus.report.summary()


def test_a_side_of_space_markers_alone_is_empty(tmp_path: Path) -> None:
    """U+2581 (sentencepiece's space marker, as in pre-tokenised text) is a space to the tokenizer: a side of
    only markers and whitespace encodes to no piece, so it is skipped and counted as an empty one (translate
    gives such a line an empty translation), and strict mode names it."""
    src = write(tmp_path / "m.en", ["keep", "\u2581", "\u2581 \u2581", "\u2581ok", "fine"])
    tgt = write(tmp_path / "m.de", ["behalten", "leer", "leer", "gut", "\u2581\u00a0\u2581"])
    corpus = read_parallel(src, tgt)
    assert corpus.sources == ["keep", "\u2581ok"]
    assert corpus.report == CorpusReport(total_lines=5, kept=2, skipped_empty=3, skipped_long=0)
    with pytest.raises(CorpusError, match=r"m\.en:2: empty sentence"):
        read_parallel(src, tgt, strict=True)


def test_strict_mode_names_the_offending_line(tmp_path: Path) -> None:
    src = write(tmp_path / "f.en", ["keep", "also"])
    tgt = write(tmp_path / "f.de", ["behalten", ""])
    with pytest.raises(CorpusError, match=r"f\.de:2: empty sentence"):
        read_parallel(src, tgt, strict=True)
    long_src = write(tmp_path / "g.en", ["keep", "x" * 30])
    with pytest.raises(CorpusError, match=r"g\.en:2: sentence of 30 characters exceeds data\.max_chars=20"):
        read_parallel(long_src, write(tmp_path / "g.de", ["a", "b"]), max_chars=20, strict=True)


def test_strict_mode_advice_names_the_settings_not_a_flag(tmp_path: Path) -> None:
    """Strict mode is the data.strict setting (no command has a --strict flag): the advice names it."""
    src = write(tmp_path / "s.en", ["keep", "also"])
    with pytest.raises(CorpusError) as empty:
        read_parallel(src, write(tmp_path / "s.de", ["behalten", ""]), strict=True)
    with pytest.raises(CorpusError) as long:
        read_parallel(src, write(tmp_path / "t.de", ["a", "x" * 30]), max_chars=20, strict=True)
    for error in (empty, long):
        assert "--strict" not in str(error.value)
        assert "set data.strict = false" in str(error.value)
    assert "raise data.max_chars" in str(long.value)


def test_nothing_kept_is_an_error(tmp_path: Path) -> None:
    src = write(tmp_path / "h.en", ["", ""])
    tgt = write(tmp_path / "h.de", ["a", "b"])
    with pytest.raises(CorpusError, match="no usable pairs out of 2 lines"):
        read_parallel(src, tgt)
    empty = tmp_path / "empty.en"
    empty.write_text("")
    with pytest.raises(CorpusError, match="no usable pairs out of 0 lines"):
        read_parallel(empty, empty)


def test_tsv_reads_pairs_and_rejects_wrong_tab_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "p.tsv", ["Hello\tHallo", "", " Two \t Zwei "])
    corpus = read_tsv(path)
    assert corpus.sources == ["Hello", "Two"]
    assert corpus.targets == ["Hallo", "Zwei"]
    assert corpus.report.skipped_empty == 1
    for bad, tabs in (("no tab here", 0), ("a\tb\tc", 2)):
        bad_path = write(tmp_path / "bad.tsv", ["ok\tfine", bad])
        with pytest.raises(CorpusError, match=rf"bad\.tsv:2: expected exactly one tab .* found {tabs}"):
            read_tsv(bad_path)


def test_read_lines_keeps_empty_lines_for_alignment(tmp_path: Path) -> None:
    path = write(tmp_path / "mono.en", ["one", "", "three"])
    assert read_lines(path) == ["one", "", "three"]


def test_errors_are_one_line_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        read_parallel(tmp_path / "x", tmp_path / "y")
    assert "\n" not in str(info.value)
    with pytest.raises(CorpusError, match="max_chars must be at least 1"):
        read_tsv(tmp_path / "x", max_chars=0)


def test_max_chars_is_inclusive_on_either_side(tmp_path: Path) -> None:
    """A side of exactly data.max_chars characters is kept; one character more is skipped, on either side."""
    src = write(tmp_path / "m.en", ["x" * 10, "x" * 11, "short", "x" * 10])
    tgt = write(tmp_path / "m.de", ["y" * 10, "short", "y" * 11, "short"])
    corpus = read_parallel(src, tgt, max_chars=10)
    assert corpus.sources == ["x" * 10, "x" * 10] and corpus.targets == ["y" * 10, "short"]
    assert corpus.report == CorpusReport(total_lines=4, kept=2, skipped_empty=0, skipped_long=2)


def test_a_tsv_line_of_whitespace_alone_is_an_empty_pair(tmp_path: Path) -> None:
    """A blank line of a CRLF file (a lone CR) or of spaces holds no tab, yet is an empty pair, not an error."""
    path = tmp_path / "w.tsv"
    path.write_bytes(b"one\teins\r\n\r\n  \r\ntwo\tzwei\r\n")
    corpus = read_tsv(path)
    assert (corpus.sources, corpus.targets) == (["one", "two"], ["eins", "zwei"])
    assert corpus.report == CorpusReport(total_lines=4, kept=2, skipped_empty=2, skipped_long=0)
