"""Fetch the raw Multi30k task 1 text (Elliott et al., 2016) from the multi30k/dataset repository.

Upstream stores each file gzipped (`train.en.gz`, `val.en.gz`, `test_2016_flickr.en.gz`, ...); we save
them decompressed as train.L, val.L and test2016.L. Every file is downloaded and checked (gzip, UTF-8,
equal line counts across the languages of a split, SHA-256 of the known upstream content) before the
first one is written, and each is written to a temporary file and renamed, so a failure never leaves a
half-written file behind; a write that fails (a full disk) removes the files this call created, so no
partial set is left (those `overwrite=True` replaced stay replaced). Existing files are never replaced
unless `overwrite=True`.

The data's terms (from its README): research and educational, non-commercial use; cite Elliott et al.
2016. It is therefore downloaded on request, never shipped with tformer.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tformer.atomic_file import directories_made, write_atomic
from tformer.input_paths import read_stream_at_most
from tformer.multi30k import MULTI30K_BASE_URL, MULTI30K_LANGUAGES, MULTI30K_SHA256, MULTI30K_SPLITS

# the largest Multi30k files are ~0.6 MB gzipped and ~2.1 MB of text (train.de, train.fr): far past these is not one
MAX_DOWNLOAD_BYTES = 64 * 2**20
MAX_TEXT_BYTES = 256 * 2**20


class DownloadError(ValueError):
    """A download failed or produced unexpected content; the message names the URL or file."""


def download_multi30k(
    out_dir: str | Path,
    *,
    base_url: str = MULTI30K_BASE_URL,
    languages: Sequence[str] = MULTI30K_LANGUAGES,
    overwrite: bool = False,
    checksums: Mapping[str, str] | None = MULTI30K_SHA256,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Download, verify and save train/val/test2016 for `languages`; returns the written paths.

    `checksums=None` skips the SHA-256 check (for a mirror holding other content, such as a test's).
    """
    unknown = sorted(set(languages) - set(MULTI30K_LANGUAGES))
    if not languages:  # `--languages ,` or `--languages ""`
        raise DownloadError(f"no language given; choose from {', '.join(MULTI30K_LANGUAGES)} (e.g. --languages en,de)")
    if unknown:
        raise DownloadError(f"unknown language(s) {', '.join(unknown)}; choose from {', '.join(MULTI30K_LANGUAGES)}")
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise DownloadError(f"base URL must start with https://, http:// or file://, got {base_url!r}")
    if not (math.isfinite(timeout) and timeout > 0):  # 0 would make every request fail at once
        raise DownloadError(f"--timeout must be a positive number of seconds, got {timeout}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    languages = list(dict.fromkeys(languages))  # `--languages en,en` fetches and writes en once
    names = [f"{split}.{language}" for split in MULTI30K_SPLITS for language in languages]
    if directory := next((out_dir / name for name in names if (out_dir / name).is_dir()), None):
        # found before any download: writing the set stopped there, with the files before it replaced
        raise DownloadError(f"{directory} is a directory, where the corpus file goes; move it or choose another --out")
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DownloadError(f"{out_dir / existing[0]} already exists ({len(existing)} file(s)); pass --overwrite")

    contents: dict[str, bytes] = {}
    for split, stem in MULTI30K_SPLITS.items():
        line_counts: dict[str, int] = {}
        for language in languages:
            url = file_url(base_url, f"{stem}.{language}.gz")
            if progress is not None:
                progress(f"fetching {url}")
            data = _decompress(fetch(url, timeout=timeout), url)
            _check_content(f"{split}.{language}", data, url, checksums)
            contents[f"{split}.{language}"] = data
            line_counts[language] = data.count(b"\n")
        if len(set(line_counts.values())) > 1:
            counts = ", ".join(f"{language}={count}" for language, count in line_counts.items())
            raise DownloadError(f"{split}: languages have different line counts ({counts}); the mirror is broken")

    return _write_all(out_dir, {name: contents[name] for name in names})


def _write_all(out_dir: Path, contents: dict[str, bytes]) -> list[Path]:
    """Write each file atomically; when one fails (a full disk), remove those this call created, and `out_dir`
    and the folders above it if it made them: a rerun then finds no partial set to refuse as already there."""
    written, created = [], []
    with directories_made(out_dir):
        try:
            for name, data in contents.items():
                is_new = not (out_dir / name).exists()
                written.append(write_atomic(out_dir / name, data))
                if is_new:
                    created.append(out_dir / name)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
    return written


# what to do when a file cannot be fetched (no network, a proxy, a mirror down): every such error ends with it
FETCH_ADVICE = (
    "check the network and retry, or fetch the .gz files another way into a directory DIR and "
    "pass --base-url file:///DIR"
)


def file_url(base_url: str, name: str) -> str:
    """`name` in the directory `base_url` names, its query string (a mirror's access token) kept after it:
    https://host/dir?token=x -> https://host/dir/name?token=x."""
    parts = urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def fetch(url: str, *, timeout: float) -> bytes:
    """The body at `url`, refused past MAX_DOWNLOAD_BYTES; any network or HTTP failure becomes a one-line
    DownloadError."""
    limit = MAX_DOWNLOAD_BYTES
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = read_stream_at_most(response, limit)  # a read of at most n bytes ends short at a cut, silently
            if data is not None and getattr(response, "length", None):  # HTTP: Content-Length bytes still due
                raise http.client.IncompleteRead(data, response.length)
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} {error.reason}"
    except urllib.error.URLError as error:
        reason = str(error.reason)
    except http.client.IncompleteRead as error:  # the connection closed mid-transfer
        reason = f"the transfer broke off after {len(error.partial):,} bytes"
    except http.client.HTTPException as error:  # not an OSError: a reply that is not HTTP
        reason = f"not an HTTP reply ({type(error).__name__}: {str(error).strip()[:80]!r})"
    except (TimeoutError, OSError, ValueError) as error:
        reason = str(error)
    else:
        if data is None:
            raise DownloadError(
                f"{url} sent more than {limit:,} bytes, far more than a Multi30k file: a wrong --base-url?"
            )
        return data
    raise DownloadError(f"could not download {url}: {reason}; {FETCH_ADVICE}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that cannot be created (it, or a parent, is a file) before any download,
    rather than after fetching everything."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out_dir else f" ({path})"
                raise DownloadError(f"--out {out_dir}: not a directory{where}; choose a directory for the corpus")
            return


def _decompress(data: bytes, url: str) -> bytes:
    """The gzip data's content, refused past MAX_TEXT_BYTES (read no further: a small file can unpack to gigabytes)."""
    limit = MAX_TEXT_BYTES
    if not data.startswith(b"\x1f\x8b"):
        raise DownloadError(f"{url} did not return gzip data (got {len(data)} bytes starting {data[:16]!r})")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as unpacked:
            text = read_stream_at_most(unpacked, limit)
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{url}: corrupt gzip data ({error})") from None
    if text is None:
        raise DownloadError(f"{url} unpacks to more than {limit:,} bytes, far more than a Multi30k file")
    return text


def _check_content(name: str, data: bytes, url: str, checksums: Mapping[str, str] | None) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DownloadError(f"{url}: not UTF-8 text (byte {error.start})") from None
    if checksums is not None and name in checksums:
        digest = hashlib.sha256(data).hexdigest()
        if digest != checksums[name]:
            raise DownloadError(
                f"{url}: SHA-256 {digest[:12]}... differs from the known {checksums[name][:12]}...; "
                "the upstream file changed (pass --no-verify to accept it)"
            )
