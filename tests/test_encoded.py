"""Encoded pairs in flat arrays, and the run's cache of them: same batches as lists of ids, a resume
that reads the cache instead of encoding, and a miss whenever what the pairs depend on changed."""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from training_helpers import tiny_experiment, write_corpus

from tformer.config import DataConfig
from tformer.data import encoded as encoded_module
from tformer.data.batching import BatchStream, collate
from tformer.data.encoded import EncodedPairs, TokenRows, encode_rows, id_dtype
from tformer.training import encoded_cache, load_run, resume_run, start_run, training_text

pytestmark = pytest.mark.usefixtures("one_thread")

rows_strategy = st.lists(st.lists(st.integers(0, 70_000), max_size=12), max_size=30)


@given(rows=rows_strategy, data=st.data())
@settings(max_examples=60, deadline=None)
def test_token_rows_hold_exactly_the_lists(rows: list[list[int]], data: st.DataObject) -> None:
    token_rows = TokenRows.from_lists(rows)
    assert len(token_rows) == len(rows)
    assert [token_rows[i].tolist() for i in range(len(rows))] == rows
    assert token_rows.lengths_R.tolist() == [len(row) for row in rows]
    if rows:
        keep_R = np.array(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))))
        kept = token_rows.keep(keep_R)
        assert [kept[i].tolist() for i in range(len(kept))] == [
            row for row, keep in zip(rows, keep_R, strict=True) if keep
        ]
        split = data.draw(st.integers(0, len(rows)))
        joined = TokenRows.concatenate([TokenRows.from_lists(rows[:split]), TokenRows.from_lists(rows[split:])])
        assert [joined[i].tolist() for i in range(len(rows))] == rows


def test_ids_take_two_bytes_when_the_vocabulary_allows() -> None:
    assert TokenRows.from_lists([[5, 65_535]]).ids_N.dtype == np.uint16
    assert TokenRows.from_lists([[5, 65_536]]).ids_N.dtype == np.int32
    assert id_dtype(31_999) == np.uint16
    mixed = TokenRows.concatenate([TokenRows.from_lists([[1]]), TokenRows.from_lists([[70_000]])])
    assert mixed.ids_N.dtype == np.int32 and mixed[1].tolist() == [70_000]
    with pytest.raises(ValueError, match="non-negative"):
        TokenRows.from_lists([[1, -2]])


def test_keeping_the_pairs_that_fit_costs_no_int64_array_a_token() -> None:
    """Dropping the few pairs over model.max_positions from a corpus of millions gathered its tokens by
    int64 indices, several arrays of 8 bytes a token at once: the run's peak memory (2 million pairs: 3.0 GB,
    of which 1.2 GB for this). A mask takes one byte a token; the result two (uint16 ids)."""
    rows = TokenRows.from_lists([[7, 8, 9, 10] * 25] * 10_000)  # 1,000,000 tokens
    keep_R = np.ones(len(rows), dtype=bool)
    keep_R[::1000] = False
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        kept = rows.keep(keep_R)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(kept) == 9_990 and kept[0].tolist() == rows[1].tolist()
    assert peak_bytes < 4 * len(rows.ids_N), peak_bytes


def test_padded_rows_follow_the_conventions() -> None:
    rows = TokenRows.from_lists([[5, 6, 7], [], [9]])
    assert rows.padded([2, 0, 1], first=1, last=None, pad_id=0).tolist() == [[1, 9, 0, 0], [1, 5, 6, 7], [1, 0, 0, 0]]
    assert rows.padded([1, 2], first=None, last=2, pad_id=0).tolist() == [[2, 0], [9, 2]]


def test_encoding_in_chunks_equals_encoding_at_once() -> None:
    texts = [f"sentence {i}" for i in range(11)]

    def encode(batch):
        return [[len(text), *map(ord, text[-2:])] for text in batch]

    whole = encode(texts)
    for chunk in (1, 3, 11, 50):
        rows = encode_rows(encode, texts, chunk=chunk)
        assert [rows[i].tolist() for i in range(len(texts))] == whole


def test_batches_from_arrays_equal_batches_from_lists() -> None:
    rng = np.random.default_rng(0)
    pairs = [
        (rng.integers(4, 40, rng.integers(0, 9)).tolist(), rng.integers(4, 40, rng.integers(1, 9)).tolist())
        for _ in range(50)
    ]
    special = dict(pad_id=0, bos_id=1, eos_id=2)
    for rows in ([3], [7, 1, 49, 0], list(range(50))):
        batch = collate(EncodedPairs.from_pairs(pairs), rows, **special)
        for b, i in enumerate(rows):
            src, tgt = pairs[i]
            assert (
                batch.src_ids[b, : len(src) + 1].tolist() == [*src, 2] and (batch.src_ids[b, len(src) + 1 :] == 0).all()
            )
            assert batch.tgt_in[b, : len(tgt) + 1].tolist() == [1, *tgt]
            assert batch.tgt_out[b, : len(tgt) + 1].tolist() == [*tgt, 2]
        assert batch.n_src_tokens == int((batch.src_ids != 0).sum())
        assert batch.n_tgt_tokens == int((batch.tgt_out != 0).sum())
    stream = BatchStream(pairs, max_tokens=40, seed=0, **special)
    assert isinstance(stream.pairs, EncodedPairs) and stream.pairs.sources.ids_N.dtype == np.uint16


def _cached_dirs(run: Path) -> list[str]:
    return sorted(path.name for path in (run / encoded_cache.CACHE_DIR).iterdir())


def test_a_resume_reads_the_encoded_cache_and_trains_the_same(tmp_path: Path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path)
    experiment = tiny_experiment(corpus, "train.max_steps=8", "train.save_every=4")
    start_run(experiment, tmp_path / "whole", quiet=True).train()
    cut = start_run(
        dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, max_steps=4)),
        tmp_path / "cut",
        quiet=True,
    )
    cut.train()
    assert len(_cached_dirs(tmp_path / "cut")) == 1

    encoded_sizes = []
    real = encoded_module.encode_rows
    monkeypatch.setattr(
        training_text, "encode_rows", lambda e, texts: encoded_sizes.append(len(texts)) or real(e, texts)
    )
    resumed = resume_run(tmp_path / "cut", overrides=["train.max_steps=8"], quiet=True)
    assert encoded_sizes == [12, 12]  # the validation set only: the 200 training pairs come from the cache
    assert isinstance(resumed.data.stream.pairs.sources.ids_N, np.memmap)
    resumed.train()
    whole, again = (
        torch.load(run / "checkpoints" / "step-00000008" / "trainer_state.pt", weights_only=False)
        for run in (tmp_path / "whole", tmp_path / "cut")
    )
    assert whole["stream"] == again["stream"]
    for x, y in zip(
        load_run(tmp_path / "whole").model.state_dict().values(),
        load_run(tmp_path / "cut").model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(x, y)


def test_pairs_over_max_positions_are_reported_alike_when_encoded_and_when_cached(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    experiment = tiny_experiment(
        corpus, "model.max_positions=8", "train.max_steps=1", "train.save_every=1", valid=False
    )
    start_run(experiment, run).train()
    encoded = [line for line in capsys.readouterr().err.splitlines() if "model.max_positions" in line]
    assert len(encoded) == 1 and re.fullmatch(
        r"train: skipped [1-9]\d* pairs longer than model.max_positions=8", encoded[0]
    )
    monkeypatch.setattr(training_text, "encode_rows", lambda *a, **k: pytest.fail("read from the cache"))
    resume_run(run, overrides=["train.max_steps=2"])
    assert [line for line in capsys.readouterr().err.splitlines() if "model.max_positions" in line] == encoded


def test_the_slow_setup_phases_are_announced_before_they_start(tmp_path: Path, capsys) -> None:
    """Training the tokenizer and encoding 2 million pairs took 54 s and 116 s on a 2-core CPU, with
    nothing on stderr between "training data: ..." and the lines that follow them. A resume reads the
    cache: nothing is encoded, so nothing says so."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=1", "train.save_every=1", valid=False), run).train()
    err = capsys.readouterr().err.splitlines()
    order = [
        "training data: ",
        "tokenizer: training on 200 pairs",
        "tokenizer: Tokenizer(",
        "train: encoding 200 pairs",
        "effective batch: ",
    ]
    assert [start for line in err for start in order if line.startswith(start)] == order, err
    resume_run(run, overrides=["train.max_steps=2"])
    assert not any("encoding" in line for line in capsys.readouterr().err.splitlines())


def test_a_validation_set_of_more_batches_than_valid_every_is_warned_about(tmp_path: Path, capsys) -> None:
    """200,000 validation pairs made each validation of a tiny model take 7 minutes on 2 CPU cores,
    with train.valid_every=200 training steps between them, and nothing said."""
    corpus = write_corpus(tmp_path, n_valid=200)
    experiment = tiny_experiment(corpus, "train.max_steps=1", "train.max_tokens=64")

    def warned_with(valid_every: int) -> list[str]:
        train = dataclasses.replace(experiment.train, valid_every=valid_every)
        start_run(dataclasses.replace(experiment, train=train), tmp_path / f"every-{valid_every}")
        return [line for line in capsys.readouterr().err.splitlines() if "validation set" in line]

    warned = warned_with(1)
    found = re.match(r"warning: the validation set makes (\d+) batches, more than the train.valid_every=1 ", warned[0])
    assert len(warned) == 1 and found, warned
    batches = int(found[1])
    assert batches > 2
    assert warned_with(batches) == []  # as many batches as steps between validations: said only beyond that
    assert len(warned_with(batches - 1)) == 1


def test_a_changed_corpus_file_is_encoded_again(tmp_path: Path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2"), run, quiet=True).train()
    before = _cached_dirs(run)
    lines = corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
    lines[0] += " cat"  # same line count, one target longer
    corpus["train_tgt"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    calls = []
    real = encoded_module.encode_rows
    monkeypatch.setattr(training_text, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = resume_run(run, overrides=["train.max_steps=3"], quiet=True)
    assert calls and resumed.data.stream.pairs.targets[0].tolist()[-1] == resumed.tokenizer.encode_target("cat")[-1]
    after = _cached_dirs(run)
    assert len(after) == 1 and after != before  # the stale cache is replaced, not kept beside


def test_a_damaged_cache_is_a_miss_and_a_failed_save_only_warns(tmp_path: Path) -> None:
    pairs = EncodedPairs.from_pairs([([5, 6], [7]), ([8], [9, 10, 11])])
    key = encoded_cache.CorpusKey("a" * 8, "b" * 8, tokenizer=1, max_chars=10, strict=False, max_positions=64)
    assert encoded_cache.save(tmp_path, key, encoded_cache.CachedCorpus(pairs, skipped_overlong=3)) is None
    loaded = encoded_cache.load(tmp_path, key)
    assert loaded is not None and loaded.skipped_overlong == 3
    assert [loaded.pairs[i][1].tolist() for i in range(2)] == [[7], [9, 10, 11]]
    assert encoded_cache.load(tmp_path, dataclasses.replace(key, max_positions=32)) is None
    offsets = tmp_path / encoded_cache.CACHE_DIR / key.directory_name() / "targets.offsets.npy"
    offsets.write_bytes(offsets.read_bytes()[:-8])  # truncated
    assert encoded_cache.load(tmp_path, key) is None
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    problem = encoded_cache.save(blocked, key, encoded_cache.CachedCorpus(pairs, skipped_overlong=0))
    assert problem is not None and blocked.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("key.json", lambda path: path.write_text("[]", encoding="utf-8")),
        ("sources.ids.npy", lambda path: path.write_bytes(b"")),
        ("targets.offsets.npy", lambda path: np.save(path, np.load(path).astype(np.float64))),
        ("sources.offsets.npy", lambda path: np.save(path, np.array([0, 3, 1, 3], dtype=np.int64))),
        ("targets.ids.npy", lambda path: np.save(path, np.load(path).astype(np.float32))),
    ],
)
def test_a_cache_damaged_yet_loadable_is_a_miss(tmp_path: Path, name: str, damage) -> None:
    pairs = EncodedPairs.from_pairs([([5, 6], [7]), ([8], [9, 10, 11]), ([], [12])])
    key = encoded_cache.CorpusKey("a" * 8, "b" * 8, tokenizer=1, max_chars=10, strict=False, max_positions=64)
    assert encoded_cache.save(tmp_path, key, encoded_cache.CachedCorpus(pairs, skipped_overlong=0)) is None
    damage(tmp_path / encoded_cache.CACHE_DIR / key.directory_name() / name)
    assert encoded_cache.load(tmp_path, key) is None


def test_a_failed_save_names_the_path_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    pairs = EncodedPairs.from_pairs([([5, 6], [7])])
    key = encoded_cache.CorpusKey("a" * 8, "b" * 8, tokenizer=1, max_chars=10, strict=False, max_positions=64)
    in_the_way = tmp_path / encoded_cache.CACHE_DIR / key.directory_name()
    in_the_way.parent.mkdir()
    in_the_way.write_text("someone's file")
    problem = encoded_cache.save(tmp_path, key, encoded_cache.CachedCorpus(pairs, skipped_overlong=0))
    assert problem is not None and str(in_the_way) in problem and in_the_way.read_text() == "someone's file"

    def disk_full(path: Path, array: np.ndarray) -> None:
        Path(path).write_bytes(b"\x93NUMPY")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encoded_cache.np, "save", disk_full)
    problem = encoded_cache.save(tmp_path / "run", key, encoded_cache.CachedCorpus(pairs, skipped_overlong=0))
    assert problem == f"{tmp_path / 'run' / encoded_cache.CACHE_DIR}: No space left on device"
    assert list((tmp_path / "run" / encoded_cache.CACHE_DIR).iterdir()) == []


def test_adopt_links_or_copies_another_runs_cache_of_the_key_and_otherwise_leaves_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    pairs = EncodedPairs.from_pairs([([5, 6], [7]), ([8], [9, 10, 11])])
    key = encoded_cache.CorpusKey("a", "b", tokenizer=1, max_chars=10, strict=False, max_positions=64)
    assert encoded_cache.save(tmp_path / "old", key, encoded_cache.CachedCorpus(pairs, skipped_overlong=2)) is None
    encoded_cache.adopt(tmp_path / "old", tmp_path / "linked", key)
    linked = encoded_cache.load(tmp_path / "linked", key)
    assert linked is not None and linked.skipped_overlong == 2 and linked.pairs.sources[1].tolist() == [8]
    assert all(path.stat().st_nlink == 2 for path in (tmp_path / "linked" / encoded_cache.CACHE_DIR).rglob("*.npy"))
    other = dataclasses.replace(key, max_positions=32)
    encoded_cache.adopt(tmp_path / "old", tmp_path / "other", other)  # no cache of that key: nothing made
    assert not (tmp_path / "other").exists()

    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(encoded_cache.os, "link", no_links)
    encoded_cache.adopt(tmp_path / "old", tmp_path / "copied", key)
    assert encoded_cache.load(tmp_path / "copied", key) is not None
    monkeypatch.setattr(encoded_cache.shutil, "copy2", no_links)  # a full disk: no cache, no temporary left
    encoded_cache.adopt(tmp_path / "old", tmp_path / "failed", key)
    assert encoded_cache.load(tmp_path / "failed", key) is None
    assert list((tmp_path / "failed" / encoded_cache.CACHE_DIR).iterdir()) == []


def test_a_file_edited_while_a_new_run_sets_up_is_not_cached_under_its_new_bytes(tmp_path: Path, monkeypatch) -> None:
    """The cache's key is the digest of the bytes read: a corpus file rewritten after it was read (while the
    tokenizer trains, minutes on a large corpus) must make the next resume encode the text again."""
    corpus = write_corpus(tmp_path)
    real_read = training_text.read_parallel

    def read_then_edit(src_path, tgt_path, **kwargs):
        read = real_read(src_path, tgt_path, **kwargs)
        if tgt_path == str(corpus["train_tgt"]):  # the training text, not the validation set read later
            lines = corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
            corpus["train_tgt"].write_text("\n".join([lines[0] + " cat", *lines[1:]]) + "\n", encoding="utf-8")
        return read

    monkeypatch.setattr(training_text, "read_parallel", read_then_edit)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2"), run, quiet=True).train()
    monkeypatch.setattr(training_text, "read_parallel", real_read)
    encoded_sizes = []
    real = encoded_module.encode_rows
    monkeypatch.setattr(
        training_text, "encode_rows", lambda e, texts: encoded_sizes.append(len(texts)) or real(e, texts)
    )
    resume_run(run, overrides=["train.max_steps=3"], quiet=True)
    assert 200 in encoded_sizes  # the edited text was encoded again, not taken from the cache of the old text


def test_a_resume_on_a_changed_corpus_file_names_it_and_says_what_the_new_text_keeps(tmp_path: Path, capsys) -> None:
    """The run goes on with the new text, as documented, but not silently: the epoch under way is cut
    from other pairs, and pairs the new text loses (an emptied line) are counted as at the run's start."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2", valid=False), run).train()
    capsys.readouterr()
    resume_run(run, overrides=["train.max_steps=3"])
    assert "changed since" not in capsys.readouterr().err  # same files: nothing to say
    lines = corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
    corpus["train_tgt"].write_text("\n".join(["", *lines[1:]]) + "\n", encoding="utf-8")
    resume_run(run, overrides=["train.max_steps=4"])
    err = capsys.readouterr().err.splitlines()
    changed = [line for line in err if "changed since" in line]
    assert len(changed) == 1 and str(corpus["train_tgt"]) in changed[0] and str(corpus["train_src"]) not in changed[0]
    assert "training data: kept 199 of 200 pairs (skipped 1 with an empty side, 0 over the length limit)" in err


def test_a_changed_file_given_as_source_and_target_is_named_once(tmp_path: Path) -> None:
    """One file as both sides (a copy task): the warning names it once, not as "F and F changed"."""
    key_dir = tmp_path / encoded_cache.CACHE_DIR / "train-0"
    key_dir.mkdir(parents=True)
    (key_dir / "key.json").write_text('{"key": {"source_digest": "old", "target_digest": "old"}}', encoding="utf-8")
    said: list[str] = []
    data = DataConfig(train_src=str(tmp_path / "text"), train_tgt=str(tmp_path / "text"))
    training_text._say_changed_files(tmp_path, ("new", "new"), data, said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: {tmp_path / 'text'} changed since"), said


def test_quiet_keeps_the_warnings(tmp_path: Path, capsys) -> None:
    """--quiet hides progress and log lines, not a warning: a resume on a changed training file says so."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    settings = ("train.max_steps=2", "train.warmup_steps=1", "train.save_every=2")  # no warm-up warning
    start_run(tiny_experiment(corpus, *settings, valid=False), run, quiet=True).train()
    assert capsys.readouterr().err == ""
    lines = corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
    corpus["train_tgt"].write_text("\n".join(["", *lines[1:]]) + "\n", encoding="utf-8")
    resume_run(run, overrides=["train.max_steps=3"], quiet=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {corpus['train_tgt']} changed since"), err


def test_the_cache_key_changes_with_each_thing_the_pairs_depend_on(tmp_path: Path) -> None:
    """Another tokenizer, data.max_chars, data.strict or model.max_positions encodes other pairs from the
    same files: each must name another cache directory, else a resume would read pairs of other ids."""
    from types import SimpleNamespace

    corpus = write_corpus(tmp_path)
    digests = ("a" * 8, "b" * 8)

    def name(*overrides: str, fingerprint: int = 7) -> str:
        tokenizer = SimpleNamespace(fingerprint=lambda: fingerprint)
        return training_text._corpus_key(tiny_experiment(corpus, *overrides), tokenizer, digests).directory_name()

    names = [
        name(),
        name(fingerprint=8),
        name("data.max_chars=999"),
        name("data.strict=true"),
        name("model.max_positions=100"),
    ]
    assert len(set(names)) == len(names)
    assert name() == names[0]  # and the same settings name the same directory
