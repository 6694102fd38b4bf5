"""Multi30k download against a local file:// mirror: names, verification, atomicity, CLI errors."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

import tformer.data.download as download_module
from tformer.cli.main import main
from tformer.data.download import MULTI30K_SPLITS, DownloadError, download_multi30k, write_atomic

LINES = {"en": ["A dog runs.", "Two men talk."], "de": ["Ein Hund rennt.", "Zwei Männer reden."]}


def make_mirror(root: Path, lines: dict[str, list[str]] = LINES) -> str:
    """Upstream layout: <stem>.<lang>.gz for every split; returns the file:// base URL."""
    root.mkdir(parents=True, exist_ok=True)
    for stem in MULTI30K_SPLITS.values():
        for language, text in lines.items():
            payload = "".join(f"{stem}: {line}\n" for line in text).encode()
            (root / f"{stem}.{language}.gz").write_bytes(gzip.compress(payload))
    return root.as_uri() + "/"


def test_downloads_decompresses_and_renames(tmp_path: Path) -> None:
    base = make_mirror(tmp_path / "mirror")
    written = download_multi30k(tmp_path / "out", base_url=base, languages=["en", "de"], checksums=None)
    names = sorted(p.name for p in written)
    assert names == sorted(f"{s}.{lang}" for s in ("train", "val", "test2016") for lang in ("en", "de"))
    assert (tmp_path / "out" / "test2016.de").read_text(encoding="utf-8") == (
        "test_2016_flickr: Ein Hund rennt.\ntest_2016_flickr: Zwei Männer reden.\n"
    )
    assert not list((tmp_path / "out").glob(".*part"))  # no temporary files left behind


def test_checksums_are_verified(tmp_path: Path) -> None:
    base = make_mirror(tmp_path / "mirror")
    good = hashlib.sha256(b"train: A dog runs.\ntrain: Two men talk.\n").hexdigest()
    download_multi30k(tmp_path / "ok", base_url=base, languages=["en"], checksums={"train.en": good})
    with pytest.raises(DownloadError, match=r"train\.en\.gz: SHA-256 .* differs"):
        download_multi30k(tmp_path / "bad", base_url=base, languages=["en"], checksums={"train.en": "0" * 64})
    assert not (tmp_path / "bad").exists()  # nothing written when any check fails


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    base = make_mirror(tmp_path / "mirror")
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.en").write_text("keep me\n")
    with pytest.raises(DownloadError, match=r"val\.en already exists .*--overwrite"):
        download_multi30k(out, base_url=base, languages=["en"], checksums=None)
    assert (out / "val.en").read_text() == "keep me\n"
    download_multi30k(out, base_url=base, languages=["en"], checksums=None, overwrite=True)
    assert (out / "val.en").read_text().startswith("val: A dog")


def test_failures_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    base = make_mirror(tmp_path / "mirror")
    (tmp_path / "mirror" / "val.de.gz").unlink()
    with pytest.raises(DownloadError, match=r"could not download .*val\.de\.gz") as info:
        download_multi30k(tmp_path / "out", base_url=base, languages=["en", "de"], checksums=None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()

    (tmp_path / "mirror" / "val.de.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(DownloadError, match="did not return gzip data"):
        download_multi30k(tmp_path / "out", base_url=base, languages=["en", "de"], checksums=None)

    uneven = make_mirror(tmp_path / "uneven", {"en": ["a", "b"], "de": ["c"]})
    with pytest.raises(DownloadError, match=r"different line counts \(en=2, de=1\)"):
        download_multi30k(tmp_path / "out", base_url=uneven, languages=["en", "de"], checksums=None)

    with pytest.raises(DownloadError, match="unknown language"):
        download_multi30k(tmp_path / "out", base_url=base, languages=["xx"])


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_cli_downloads_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_mirror(tmp_path / "mirror")
    out = tmp_path / "data"
    args = ["download", "multi30k", "--out", str(out), "--base-url", base, "--languages", "en,de", "--no-verify"]
    assert main(args) == 0
    assert (out / "train.en").exists() and str(out / "train.de") in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    new = str(tmp_path / "new")
    assert main(["download", "multi30k", "--out", new, "--base-url", (tmp_path / "nowhere").as_uri()]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: could not download")
    assert main(["download", "multi30k", "--out", new, "--base-url", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: base URL must start with https://, http:// or file://, got {str(tmp_path)!r}\n"
    )


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_mode_open_gives(tmp_path: Path, umask: int) -> None:
    """Not mkstemp's 0600: downloaded data is as readable as any file the user writes."""
    base = make_mirror(tmp_path / "mirror")
    previous = os.umask(umask)
    try:
        (tmp_path / "probe").write_text("")
        written = download_multi30k(tmp_path / "out", base_url=base, languages=["en"], checksums=None)
        write_atomic(tmp_path / "f.txt", b"data")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "probe").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in [*written, tmp_path / "f.txt"]:
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(expected), path


def test_bad_out_and_timeout_fail_before_any_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The mirror does not exist: an error about it would mean a download was tried first."""
    nowhere = (tmp_path / "nowhere").as_uri()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [
        (["--out", str(a_file)], f"error: --out {a_file}: not a directory; choose a directory"),
        (["--out", str(a_file / "sub")], f"error: --out {a_file / 'sub'}: not a directory ({a_file})"),
        (["--out", str(tmp_path / "new"), "--timeout", "0"], "error: --timeout must be a positive number"),
        (["--out", str(tmp_path / "new"), "--timeout", "nan"], "error: --timeout must be a positive number"),
        # it said "unknown language(s) ; choose from ...", an empty list of unknown ones
        (["--out", str(tmp_path / "new"), "--languages", " , "], "error: no language given; choose from en, de, fr"),
    ]
    for extra, message in cases:
        assert main(["download", "multi30k", "--base-url", nowhere, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert a_file.read_text() == "keep me\n" and not (tmp_path / "new").exists()


def serve_once_each(replies: list[bytes], paths: list[str] | None = None) -> tuple[str, threading.Thread]:
    """A localhost server that answers its n-th connection with replies[n], raw bytes, then closes it; the
    path each request asked for is appended to `paths`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with listener:
            for reply in replies:
                connection, _ = listener.accept()
                with connection:
                    request = connection.recv(65536)
                    if paths is not None:
                        paths.append(request.split(b" ")[1].decode())
                    connection.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/", thread


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n\x1f\x8bshort", "the transfer broke off after 7 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nZZ\r\n", "the transfer broke off"),
        (b"garbage, not HTTP\r\n\r\n", "not an HTTP reply (BadStatusLine"),
    ],
    ids=["cut_off", "cut_off_chunked", "not_http"],
)
def test_a_broken_transfer_is_one_line_saying_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reply: bytes, reason: str
) -> None:
    """http.client's IncompleteRead and BadStatusLine are no OSError: they escaped as tracebacks."""
    base, thread = serve_once_each([reply])
    out = tmp_path / "out"
    assert main(["download", "multi30k", "--out", str(out), "--base-url", base, "--languages", "en"]) == 2
    thread.join(timeout=30)
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: could not download {base}train.en.gz: {reason}"), err
    assert err.endswith(
        "check the network and retry, or fetch the .gz files another way into a directory DIR and "
        "pass --base-url file:///DIR"
    ), err
    assert not out.exists()


def test_help_and_docs_state_the_terms_of_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    """Multi30k is for research and education only: whoever downloads it is told so before they fetch it."""
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "research and education only, not commercially; cite Elliott et al. 2016" in shown
    training_md = " ".join((Path(__file__).parents[1] / "docs" / "training.md").read_text(encoding="utf-8").split())
    assert "terms allow research and educational use only, not commercial" in training_md


def test_a_directory_where_a_file_goes_is_refused_before_any_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --overwrite, it stopped the writing after everything was fetched, train.en already replaced."""
    out = tmp_path / "out"
    (out / "val.en").mkdir(parents=True)
    (out / "train.en").write_text("keep me\n")
    nowhere = (tmp_path / "nowhere").as_uri()  # an error about it would mean a download was tried first
    args = ["download", "multi30k", "--out", str(out), "--base-url", nowhere, "--languages", "en", "--overwrite"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'val.en'} is a directory, where the corpus file goes; move it or choose another --out\n"
    )
    assert (out / "train.en").read_text() == "keep me\n"


def test_a_language_given_twice_is_fetched_and_written_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_mirror(tmp_path / "mirror")
    args = ["download", "multi30k", "--out", str(tmp_path / "out"), "--base-url", base, "--no-verify"]
    assert main([*args, "--languages", "en,de,en"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [
        str(tmp_path / "out" / f"{s}.{lang}") for s in MULTI30K_SPLITS for lang in ("en", "de")
    ]
    assert captured.err.count("train.en.gz") == 1


def test_a_failed_write_leaves_no_partial_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk filled up at val.de: the files before it stayed, and the rerun refused them as 'already
    exists' instead of finishing the set. Those it created are removed; one --overwrite replaced stays new."""
    import tformer.data.download as download_module

    base = make_mirror(tmp_path / "mirror")
    calls: list[Path] = []

    def full_at_val_de(path: Path, data: bytes) -> Path:
        calls.append(path)
        if path.name == "val.de":
            raise OSError(28, "No space left on device", str(path))
        return write_atomic(path, data)

    monkeypatch.setattr(download_module, "write_atomic", full_at_val_de)
    out = tmp_path / "out"
    args = ["download", "multi30k", "--out", str(out), "--base-url", base, "--languages", "en,de", "--no-verify"]
    deeper = ["download", "multi30k", "--out", str(tmp_path / "new" / "deeper"), *args[4:]]
    assert main(deeper) == 2  # the folders made above --out went too: `new` was left behind, empty
    assert not (tmp_path / "new").exists()
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.endswith(f"No space left on device: '{calls[-1]}'\n")
    assert not out.exists()
    (out / "kept").mkdir(parents=True)
    (out / "val.en").write_text("keep me\n")
    assert main([*args, "--overwrite"]) == 2
    assert sorted(path.name for path in out.iterdir()) == ["kept", "val.en"]
    assert (out / "val.en").read_text().startswith("val: A dog")  # replaced as asked, not removed
    monkeypatch.undo()
    assert main([*args, "--overwrite"]) == 0


def test_a_base_url_with_a_query_string_keeps_it_after_the_file_name(tmp_path: Path) -> None:
    """A mirror's access token (`?token=x`) was followed by `/train.en.gz`: the file name went into the query."""
    seen: list[str] = []
    payload = gzip.compress(b"a line\n")
    reply = f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
    server, thread = serve_once_each([reply] * len(MULTI30K_SPLITS), seen)
    base = server + "mirror/?token=a%2Fb"
    download_multi30k(tmp_path / "out", base_url=base, languages=["en"], checksums=None)
    thread.join(timeout=30)
    assert seen == [f"/mirror/{stem}.en.gz?token=a%2Fb" for stem in MULTI30K_SPLITS.values()]
    assert (tmp_path / "out" / "val.en").read_text() == "a line\n"


def test_a_reply_or_content_far_larger_than_multi30k_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong or hostile mirror (an endless reply, a small gzip that unpacks to gigabytes) was read into
    memory whole. The limits are lowered here so that the test sends kilobytes, not megabytes."""
    monkeypatch.setattr(download_module, "MAX_DOWNLOAD_BYTES", 1000)
    big = tmp_path / "big"
    big.mkdir()
    (big / "train.en.gz").write_bytes(b"\x1f\x8b" + os.urandom(1500))
    assert (
        main(["download", "multi30k", "--out", str(tmp_path / "o1"), "--base-url", big.as_uri(), "--languages", "en"])
        == 2
    )
    err = capsys.readouterr().err.splitlines()[-1]
    reason = "sent more than 1,000 bytes, far more than a Multi30k file: a wrong --base-url?"
    assert err == f"error: {big.as_uri()}/train.en.gz {reason}"
    monkeypatch.undo()
    monkeypatch.setattr(download_module, "MAX_TEXT_BYTES", 1000)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    (bomb / "train.en.gz").write_bytes(gzip.compress(b"x\n" * 5000))  # ~60 bytes that unpack to 10,000
    assert (
        main(["download", "multi30k", "--out", str(tmp_path / "o2"), "--base-url", bomb.as_uri(), "--languages", "en"])
        == 2
    )
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"error: {bomb.as_uri()}/train.en.gz unpacks to more than 1,000 bytes, far more than a Multi30k file"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
