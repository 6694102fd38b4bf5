"""Fetch the raw Multi30k task 1 text (Elliott et al., 2016) from the multi30k/dataset repository.

Upstream stores each file gzipped (`train.en.gz`, `val.en.gz`, `test_2016_flickr.en.gz`, ...); we save
them decompressed as train.L, val.L and test2016.L. Every file is downloaded and checked (gzip, UTF-8,
equal line counts across the languages of a split, SHA-256 of the known upstream content) before the
first one is written, and each is written to a temporary file and renamed, so a failure never leaves a
half-written or mismatched set behind. Existing files are never replaced unless `overwrite=True`.

The data's terms (from its README): research and educational, non-commercial use; cite Elliott et al.
2016. It is therefore downloaded on request, never shipped with tformer.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MULTI30K_BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_LANGUAGES = ("en", "de", "fr", "cs")
# local split name -> upstream file stem
MULTI30K_SPLITS = {"train": "train", "val": "val", "test2016": "test_2016_flickr"}

# SHA-256 of the decompressed upstream files (multi30k/dataset at a3d2e0d26b56f3846f66a952536ffed4e401d05a).
MULTI30K_SHA256: dict[str, str] = {
    "test2016.cs": "45adb85f688de8407fddcbe1b36dca15d12aab868149b337e2576f2d6d2ff8d8",
    "test2016.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test2016.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "test2016.fr": "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
    "train.cs": "2be68b38c8d586ff4f54eb13cc6e1baaaa053695b3f070d3038303a47f2268da",
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "train.fr": "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    "val.cs": "d53827e469b0a1ca8d57e9e26b2b64c4bc4b33f5479c7b03ae87ae5c882c3e33",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "val.fr": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
}


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
    if unknown or not languages:
        raise DownloadError(f"unknown language(s) {', '.join(unknown)}; choose from {', '.join(MULTI30K_LANGUAGES)}")
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise DownloadError(f"base URL must start with https://, http:// or file://, got {base_url!r}")
    if not (math.isfinite(timeout) and timeout > 0):  # 0 would make every request fail at once
        raise DownloadError(f"--timeout must be a positive number of seconds, got {timeout}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    names = [f"{split}.{language}" for split in MULTI30K_SPLITS for language in languages]
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DownloadError(f"{out_dir / existing[0]} already exists ({len(existing)} file(s)); pass --overwrite")

    contents: dict[str, bytes] = {}
    for split, stem in MULTI30K_SPLITS.items():
        line_counts: dict[str, int] = {}
        for language in languages:
            url = base_url.rstrip("/") + f"/{stem}.{language}.gz"
            if progress is not None:
                progress(f"fetching {url}")
            data = _decompress(fetch(url, timeout=timeout), url)
            _check_content(f"{split}.{language}", data, url, checksums)
            contents[f"{split}.{language}"] = data
            line_counts[language] = data.count(b"\n")
        if len(set(line_counts.values())) > 1:
            counts = ", ".join(f"{language}={count}" for language, count in line_counts.items())
            raise DownloadError(f"{split}: languages have different line counts ({counts}); the mirror is broken")

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        written.append(write_atomic(out_dir / name, contents[name]))
    return written


def fetch(url: str, *, timeout: float) -> bytes:
    """The body at `url`; any network or HTTP failure becomes a one-line DownloadError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise DownloadError(f"could not download {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"could not download {url}: {error.reason}") from None
    except (TimeoutError, OSError, ValueError) as error:
        raise DownloadError(f"could not download {url}: {error}") from None


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that cannot be created (it, or a parent, is a file) before any download,
    rather than after fetching everything."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out_dir else f" ({path})"
                raise DownloadError(f"--out {out_dir}: not a directory{where}; choose a directory for the corpus")
            return


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place: readers see either
    the old file or the complete new one, never a partial write.

    The temporary file is created with mode 0666 less the umask, as open() would create `path`
    (tempfile.mkstemp's 0600 would make downloaded data private to its owner)."""
    temporary = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _decompress(data: bytes, url: str) -> bytes:
    if not data.startswith(b"\x1f\x8b"):
        raise DownloadError(f"{url} did not return gzip data (got {len(data)} bytes starting {data[:16]!r})")
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{url}: corrupt gzip data ({error})") from None


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
