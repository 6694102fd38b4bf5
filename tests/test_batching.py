"""Token-budget batching: coverage, budget, determinism, sharding, overlong reporting and resume."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tformer.data.batching import (
    Batch,
    BatchStream,
    OverlongPairsError,
    batch_cost,
    collate,
    filter_overlong,
    plan_batches,
    plan_sorted,
    shard,
    sorted_batches,
)

PAD, BOS, EOS = 0, 1, 2
lengths_strategy = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=300)
budget_strategy = st.integers(41, 400)


def cost_of(batch: list[int], lengths: list[tuple[int, int]]) -> int:
    return batch_cost(len(batch), max(lengths[i][0] for i in batch), max(lengths[i][1] for i in batch))


def test_collate_follows_the_conventions() -> None:
    pairs = [([9], [10, 11, 12, 13]), ([1], [1]), ([2], [2]), ([3], [3]), ([5, 6, 7], [8])]
    batch = collate(pairs, [4, 0], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert batch.src_ids.tolist() == [[5, 6, 7, EOS], [9, EOS, PAD, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 8, PAD, PAD, PAD], [BOS, 10, 11, 12, 13]]
    assert batch.tgt_out.tolist() == [[8, EOS, PAD, PAD, PAD], [10, 11, 12, 13, EOS]]
    assert batch.indices.tolist() == [4, 0]
    assert batch.src_ids.dtype == batch.tgt_in.dtype == batch.indices.dtype == torch.int64
    assert (batch.n_src_tokens, batch.n_tgt_tokens, batch.size) == (6, 7, 2)
    assert batch.n_tgt_tokens == int((batch.tgt_out != PAD).sum())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(3, 50), max_size=6), st.lists(st.integers(3, 50), max_size=6)),
        min_size=1,
        max_size=8,
    )
)
def test_collate_is_teacher_forcing_written_out(pairs) -> None:
    """Each row padded by hand: the decoder reads [bos] + y and predicts y + [eos], so tgt_in is tgt_out
    shifted right by one, and n_tgt_tokens counts the positions of tgt_out that are not padding."""
    batch = collate(pairs, list(range(len(pairs))), pad_id=PAD, bos_id=BOS, eos_id=EOS)
    S, T = max(len(x) for x, _ in pairs) + 1, max(len(y) for _, y in pairs) + 1

    def padded(row: list[int], width: int) -> list[int]:
        return row + [PAD] * (width - len(row))

    assert batch.src_ids.tolist() == [padded([*x, EOS], S) for x, _ in pairs]
    assert batch.tgt_in.tolist() == [padded([BOS, *y], T) for _, y in pairs]
    assert batch.tgt_out.tolist() == [padded([*y, EOS], T) for _, y in pairs]
    assert batch.n_tgt_tokens == sum(len(y) + 1 for _, y in pairs) == int((batch.tgt_out != PAD).sum())
    assert batch.n_src_tokens == sum(len(x) + 1 for x, _ in pairs) == int((batch.src_ids != PAD).sum())


def test_to_keeps_counts_and_indices_on_the_host() -> None:
    batch = collate([([4], [4])] * 3 + [([5], [6])], [3], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, Batch) and moved.n_src_tokens == 2 and moved.indices.device.type == "cpu"
    assert torch.equal(moved.tgt_out, batch.tgt_out)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.src_ids.is_pinned()


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], [], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match=r"rows 0\.\.1 of 1 pairs"):
        collate([([1], [1])], [0, 1], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match=r"rows -1\.\.0 of 1 pairs"):  # numpy would wrap -1 to the last row
        collate([([1], [1])], [-1, 0], pad_id=PAD, bos_id=BOS, eos_id=EOS)


@settings(max_examples=80, deadline=None)
@given(lengths_strategy, budget_strategy, st.integers(0, 2**31), st.integers(0, 50))
def test_every_pair_once_and_no_batch_over_budget(lengths, max_tokens, seed, epoch) -> None:
    batches = plan_batches(lengths, max_tokens=max_tokens, seed=seed, epoch=epoch)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(batch and cost_of(batch, lengths) <= max_tokens for batch in batches)
    assert plan_batches(lengths, max_tokens=max_tokens, seed=seed, epoch=epoch) == batches


@settings(max_examples=40, deadline=None)
@given(lengths_strategy, budget_strategy)
def test_every_collated_batch_fits_the_budget_in_its_real_tensors(lengths, max_tokens) -> None:
    """The budget measured on what the model receives, not by `batch_cost`: neither the encoder's B x S
    input nor the decoder's B x T one holds more than max_tokens slots, padding included."""
    pairs = [([7] * s, [8] * t) for s, t in lengths]
    for rows in plan_batches(lengths, max_tokens=max_tokens, seed=0, epoch=0):
        batch = collate(pairs, rows, pad_id=PAD, bos_id=BOS, eos_id=EOS)
        assert batch.src_ids.numel() <= max_tokens and batch.tgt_in.numel() <= max_tokens
        assert max(batch.src_ids.numel(), batch.tgt_in.numel()) == cost_of(rows, lengths)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 1000))
def test_epochs_differ_in_order(seed, epoch) -> None:
    lengths = [(i % 17, i % 13) for i in range(400)]  # dozens of batches
    plans = [plan_batches(lengths, max_tokens=100, seed=seed, epoch=epoch + k) for k in range(3)]
    assert plans[0] != plans[1] or plans[1] != plans[2]


def test_epochs_differ_in_the_contents_of_batches_of_equal_lengths() -> None:
    """Ties in length are broken by (seed, epoch): pairs of one length meet other partners each epoch,
    not only in another order of the same batches."""
    lengths = [(5, 5)] * 60  # one length: 10 batches of 6
    contents = [{frozenset(b) for b in plan_batches(lengths, max_tokens=36, seed=3, epoch=e)} for e in range(2)]
    assert all(len(batch) == 6 for batch in contents[0]) and contents[0] != contents[1]


@settings(max_examples=60, deadline=None)
@given(lengths_strategy, budget_strategy, st.integers(1, 5))
def test_shards_are_disjoint_equal_and_cover_all_but_the_tail(lengths, max_tokens, world_size) -> None:
    batches = plan_batches(lengths, max_tokens=max_tokens, seed=0, epoch=0)
    shards = [shard(batches, rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    flat = [tuple(batch) for s in shards for batch in s]
    assert len(flat) == len(set(flat)) == len(batches) - len(batches) % world_size
    assert set(flat) <= {tuple(batch) for batch in batches}


def test_shard_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard([[0]], 2, 2)


def test_batches_are_length_bucketed() -> None:
    rng = np.random.default_rng(0)
    lengths = list(zip(rng.integers(1, 100, 2000).tolist(), rng.integers(1, 100, 2000).tolist(), strict=True))
    batches = plan_batches(lengths, max_tokens=1000, seed=0, epoch=0)
    real = sum(max(s, t) + 1 for s, t in lengths)
    padded = sum(cost_of(batch, lengths) for batch in batches)
    assert padded < 1.1 * real  # random batches would pad about 2x


def test_overlong_pairs_are_reported_or_dropped() -> None:
    lengths = [(3, 3), (50, 2), (2, 99), (4, 1)]
    with pytest.raises(OverlongPairsError, match=r"2 pair\(s\) need more than max_tokens=20 .*indices 1, 2"):
        plan_batches(lengths, max_tokens=20, seed=0, epoch=0)
    assert filter_overlong(lengths, 20) == ([0, 3], [1, 2])
    batches = plan_batches(lengths, max_tokens=20, seed=0, epoch=0, drop_overlong=True)
    assert sorted(i for batch in batches for i in batch) == [0, 3]
    assert plan_sorted(lengths, max_tokens=20, drop_overlong=True) == [[0, 3]]


def test_plan_sorted_is_ascending_and_unshuffled() -> None:
    lengths = [(9, 1), (1, 1), (5, 5), (1, 2)]
    assert plan_sorted(lengths, max_tokens=10) == [[1, 3], [2], [0]]
    pairs = [([7] * s, [8] * t) for s, t in lengths]
    batches = sorted_batches(pairs, max_tokens=10, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert [b.indices.tolist() for b in batches] == [[1, 3], [2], [0]]


def test_planning_300k_pairs_places_each_once_within_the_budget() -> None:
    """A corpus-sized plan (its time is part of the setup benchmarks/prepare.py measures): every pair in exactly
    one batch, no batch over the token budget counted with padding."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 80, size=(300_000, 2))
    batches = plan_batches(lengths, max_tokens=4096, seed=0, epoch=0)
    assert sorted(int(i) for b in batches for i in b) == list(range(300_000))
    assert all(len(b) * int(lengths[b].max()) <= 4096 for b in batches)


def make_pairs(n: int) -> list[tuple[list[int], list[int]]]:
    return [([4 + i % 7] * (1 + i % 9), [5] * (1 + i % 5)) for i in range(n)]


def stream(pairs, **overrides) -> BatchStream:
    options = dict(max_tokens=30, seed=3, pad_id=PAD, bos_id=BOS, eos_id=EOS) | overrides
    return BatchStream(pairs, **options)


def test_stream_walks_epochs_and_resumes_at_the_next_batch() -> None:
    pairs = make_pairs(60)
    full = stream(pairs)
    per_epoch = len(full.plan(0))
    reference = list(islice(full, 3 * per_epoch))
    assert [(e, i) for e, i, _ in reference[: per_epoch + 1]] == [(0, i) for i in range(per_epoch)] + [(1, 0)]
    epoch0 = sorted(i for _, _, b in reference[:per_epoch] for i in b.indices.tolist())
    assert epoch0 == list(range(60))

    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        first = stream(pairs)
        consumed = list(islice(first, stop))
        state = first.state_dict()
        resumed = stream(pairs)
        resumed.load_state_dict(state)
        rest = list(islice(resumed, 3 * per_epoch - stop))
        for (e1, i1, b1), (e2, i2, b2) in zip(consumed + rest, reference, strict=True):
            assert (e1, i1) == (e2, i2)
            assert torch.equal(b1.src_ids, b2.src_ids) and torch.equal(b1.tgt_out, b2.tgt_out)


def test_stream_ranks_see_disjoint_batches() -> None:
    pairs = make_pairs(80)
    ranks = [stream(pairs, rank=r, world_size=2) for r in range(2)]
    steps = len(ranks[0].plan(0))
    seen = [
        [tuple(b.indices.tolist()) for _, _, b in islice(r, steps)]  # one epoch per rank
        for r in ranks
    ]
    assert len(seen[0]) == len(seen[1]) and not set(seen[0]) & set(seen[1])


def test_stream_errors_early() -> None:
    with pytest.raises(OverlongPairsError):
        stream([([1] * 40, [1])])
    assert stream([([1] * 40, [1]), ([1], [1])], drop_overlong=True).dropped == [0]
    # every pair dropped: the advice was "0 batch(es) ... fewer than world_size=1; lower max_tokens"
    with pytest.raises(
        OverlongPairsError,
        match=r"^every pair needs more than max_tokens=30 on its own \(the shortest needs 41\); raise max_tokens$",
    ):
        stream([([1] * 40, [1]), ([1] * 45, [1])], drop_overlong=True)
    with pytest.raises(ValueError, match="fewer than world_size=4"):
        stream(make_pairs(3), max_tokens=1000, world_size=4)
    with pytest.raises(ValueError, match="invalid batch stream state"):
        stream(make_pairs(3)).load_state_dict({"epoch": -1, "index": 0})
    with pytest.raises(ValueError, match="invalid batch stream state"):
        stream(make_pairs(3)).load_state_dict({"epoch": 0, "index": -1})
