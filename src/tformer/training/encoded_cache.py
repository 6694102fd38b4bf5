"""The training corpus encoded once per run: saved under RUN_DIR/encoded/ and memory-mapped on resume.

Reading, checking and encoding a large corpus is most of a resume's setup (a million pairs: ~20 s of
sentencepiece and Python; WMT 2014 En-De: minutes, in every process). The encoded pairs are the same
as long as what decides them is: the two corpus files' bytes, the tokenizer, and the settings that
choose which lines are kept (data.max_chars, data.strict, model.max_positions). Those make the key;
its hash names the cache's directory, so a changed file or setting simply misses and is encoded again.

The arrays are written into a temporary directory that is then renamed into place, so a reader (another
process of the run, or a later resume) sees a whole cache or none; a damaged one is a miss. Only the
main process writes, and a failed write (a full disk) costs a warning, never the run.

A cache's files are never written again once in place (a new key gets a new directory, an old one is
removed whole), so two runs may share them as hard links: `tformer train --overwrite` gives the new
run the cache of the run it replaces when the key is the same (`adopt`), and removing either run then
leaves the other's intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tformer.data.encoded import EncodedPairs, TokenRows

CACHE_DIR = "encoded"
FORMAT = 1
_ARRAYS = ("sources.ids", "sources.offsets", "targets.ids", "targets.offsets")


@dataclass(frozen=True)
class CorpusKey:
    """Everything the encoded training pairs depend on."""

    source_digest: str
    target_digest: str
    tokenizer: int  # Tokenizer.fingerprint()
    max_chars: int
    strict: bool
    max_positions: int
    format: int = FORMAT

    def directory_name(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return "train-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class CachedCorpus:
    """Encoded pairs, and how many pairs of the files were skipped as longer than model.max_positions."""

    pairs: EncodedPairs
    skipped_overlong: int


def load(run_dir: Path, key: CorpusKey) -> CachedCorpus | None:
    """The cached pairs for `key`, memory-mapped; None when there are none, or they are damaged."""
    directory = Path(run_dir) / CACHE_DIR / key.directory_name()
    try:
        meta = json.loads((directory / "key.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("key") != asdict(key):
            return None
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        pairs = EncodedPairs(
            TokenRows(arrays["sources.ids"], arrays["sources.offsets"]),
            TokenRows(arrays["targets.ids"], arrays["targets.offsets"]),
        )
        if len(pairs) != meta["pairs"] or not (_well_formed(pairs.sources) and _well_formed(pairs.targets)):
            return None
        return CachedCorpus(pairs, skipped_overlong=int(meta["skipped_overlong"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, RecursionError):  # EOFError: np.load of an empty file
        return None


def stored_digests(run_dir: Path) -> list[tuple[str, str]]:
    """The (source, target) digests of the training files that `run_dir`'s caches were made from: what
    those files held when the run last encoded them."""
    found = []
    for key_file in sorted((Path(run_dir) / CACHE_DIR).glob("train-*/key.json")):
        try:
            key = json.loads(key_file.read_text(encoding="utf-8"))["key"]
            found.append((str(key["source_digest"]), str(key["target_digest"])))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # a damaged cache tells nothing
            continue
    return found


def _well_formed(rows: TokenRows) -> bool:
    """Whether damaged arrays that still load (another dtype, offsets out of order, as after a crash or a
    hand edit) would be read as sentences: they would fail in the middle of training instead."""
    offsets_R1 = rows.offsets_R1
    if rows.ids_N.ndim != 1 or rows.ids_N.dtype not in (np.uint16, np.int32) or offsets_R1.dtype != np.int64:
        return False
    return bool((offsets_R1[1:] >= offsets_R1[:-1]).all()) and (
        rows.ids_N.dtype == np.uint16 or rows.ids_N.min(initial=0) >= 0
    )


def adopt(earlier_run: Path, run_dir: Path, key: CorpusKey) -> None:
    """Give `run_dir` the cache of `key` that `earlier_run` holds, if it holds one: hard links to its files
    (copies where the file system has no hard links), renamed into place whole like a saved cache. When
    there is none, or anything fails, nothing is left behind: `load` then misses and the run encodes."""
    source = Path(earlier_run) / CACHE_DIR / key.directory_name()
    if not (source / "key.json").is_file():
        return
    root = Path(run_dir) / CACHE_DIR
    temporary = root / f".tmp-{key.directory_name()}-{os.getpid()}"
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        for name in ("key.json", *(f"{array}.npy" for array in _ARRAYS)):
            try:
                os.link(source / name, temporary / name)
            except OSError:
                shutil.copy2(source / name, temporary / name)
        temporary.rename(root / key.directory_name())
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)


def save(run_dir: Path, key: CorpusKey, corpus: CachedCorpus) -> str | None:
    """Write the cache for `key` and remove the caches of other keys; returns why it could not be
    written (the path and the error, to warn about), or None."""
    root = Path(run_dir) / CACHE_DIR
    final = root / key.directory_name()
    temporary = root / f".tmp-{key.directory_name()}-{os.getpid()}"
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        arrays = {
            "sources.ids": corpus.pairs.sources.ids_N,
            "sources.offsets": corpus.pairs.sources.offsets_R1,
            "targets.ids": corpus.pairs.targets.ids_N,
            "targets.offsets": corpus.pairs.targets.offsets_R1,
        }
        for name, array in arrays.items():
            np.save(temporary / f"{name}.npy", np.ascontiguousarray(array))
        meta = {
            "key": asdict(key),
            "pairs": len(corpus.pairs),
            "skipped_overlong": corpus.skipped_overlong,
        }
        (temporary / "key.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        return f"{error.filename or root}: {error.strerror or error}"  # the path: what the user must look at
    for other in root.iterdir():
        if other != final and other.name.startswith(("train-", ".tmp-")):
            with contextlib.suppress(OSError):
                shutil.rmtree(other)
    return None
