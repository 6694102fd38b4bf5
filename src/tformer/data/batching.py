"""Token-budget batching with length bucketing (fairseq's `--max-tokens`), collation, and a resumable
stream of batches for training.

The paper (section 5.1): "Sentence pairs were batched together by approximate sequence length. Each
training batch contained a set of sentence pairs containing approximately 25000 source tokens and 25000
target tokens." A batch is therefore sized by tokens, not by a number of sentences: many short pairs or
few long ones. Here the budget `max_tokens` bounds the token slots a batch occupies once padded, so
`max_tokens = 25000` holds at most 25000 source and at most 25000 target tokens, padding included.
(The paper's batch is one update over its 8 GPUs; here an update reads processes x max_tokens x
train.accumulate slots, docs/training.md.) A batch's cost is:

    batch_cost(n, max_src_len, max_tgt_len) = n * max(max_src_len + 1, max_tgt_len + 1)

(+1 for the eos appended to sources, and for the bos of tgt_in / the eos of tgt_out). Taking the
larger side bounds both the encoder's B x S and the decoder's B x T tensors, so `max_tokens` caps
activation memory whichever side is longer. Pairs are sorted by length before batches are cut, so each batch holds
sentences of similar length and little padding; the order of batches is then shuffled.

Everything random derives from (seed, epoch): plans are regenerated, never stored, and a resumed run
only needs `{"epoch", "index"}` to continue from exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tformer.data.encoded import EncodedPairs

Pair = tuple[Sequence[int], Sequence[int]]


class OverlongPairsError(ValueError):
    """Some pairs cannot fit in any batch under the token budget."""


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids of B pairs, in the layout of docs/CONVENTIONS.md.

    src_ids  B S: tokens + [eos]      tgt_in  B T: [bos] + tokens      tgt_out  B T: tokens + [eos]
    indices  B:   positions of the pairs in the dataset (kept on the CPU by `to`, for host bookkeeping).

    Teacher forcing: `tgt_in` is `tgt_out` shifted right by one (the paper's "output embeddings are
    offset by one position", section 3.1). Decoder position t reads the reference tokens before t, never
    the model's own guesses, and is trained to predict `tgt_out[:, t]`; with the causal mask, every
    position of every sentence is trained in one pass. For y = [y1, y2]: tgt_in [bos, y1, y2], tgt_out
    [y1, y2, eos].

    `n_src_tokens` / `n_tgt_tokens` count non-pad positions (`n_tgt_tokens`: those of `tgt_out`, the
    positions the loss is averaged over); they are counted on the CPU at collate time so that
    normalising a loss by them never waits for a device.
    """

    src_ids: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    indices: Tensor
    n_src_tokens: int
    n_tgt_tokens: int

    @property
    def size(self) -> int:
        return self.src_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            src_ids=self.src_ids.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
            indices=self.indices,
            n_src_tokens=self.n_src_tokens,
            n_tgt_tokens=self.n_tgt_tokens,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that `to(cuda, non_blocking=True)` really overlaps with compute."""
        return Batch(
            src_ids=self.src_ids.pin_memory(),
            tgt_in=self.tgt_in.pin_memory(),
            tgt_out=self.tgt_out.pin_memory(),
            indices=self.indices,
            n_src_tokens=self.n_src_tokens,
            n_tgt_tokens=self.n_tgt_tokens,
        )


def collate(
    pairs: EncodedPairs | Sequence[Pair], rows: Sequence[int] | np.ndarray, *, pad_id: int, bos_id: int, eos_id: int
) -> Batch:
    """Pad pairs `rows` of `pairs` (ids without bos/eos) into a Batch whose `indices` are those rows."""
    pairs = as_encoded(pairs)
    rows_B = np.asarray(rows, dtype=np.int64)
    if len(rows_B) == 0:
        raise ValueError("cannot collate an empty batch")
    if rows_B.min() < 0 or rows_B.max() >= len(pairs):
        raise ValueError(f"collate asked for rows {rows_B.min()}..{rows_B.max()} of {len(pairs)} pairs")
    src_ids = pairs.sources.padded(rows_B, first=None, last=eos_id, pad_id=pad_id)
    tgt_in = pairs.targets.padded(rows_B, first=bos_id, last=None, pad_id=pad_id)
    tgt_out = pairs.targets.padded(rows_B, first=None, last=eos_id, pad_id=pad_id)
    # real (non-pad) positions: each row's ids plus its eos (in src_ids; in tgt_out, where the loss counts
    # them: tgt_in's bos is an input, never a target, and takes the place of that eos in the count)
    n_src = int(pairs.sources.row_lengths(rows_B).sum()) + len(rows_B)
    n_tgt = int(pairs.targets.row_lengths(rows_B).sum()) + len(rows_B)
    return Batch(src_ids, tgt_in, tgt_out, torch.from_numpy(rows_B.copy()), n_src, n_tgt)


def batch_cost(n_sentences: int, max_src_len: int, max_tgt_len: int) -> int:
    """Padded token slots of a batch, counting the eos (source) and bos/eos (target) each row gains."""
    return n_sentences * max(max_src_len + 1, max_tgt_len + 1)


def filter_overlong(lengths: Sequence[tuple[int, int]], max_tokens: int) -> tuple[list[int], list[int]]:
    """(kept, dropped) dataset indices: a pair is dropped when alone it already costs over max_tokens."""
    single_cost = _single_costs(_as_array(lengths))
    over = single_cost > max_tokens
    return np.flatnonzero(~over).tolist(), np.flatnonzero(over).tolist()


def plan_batches(
    lengths: Sequence[tuple[int, int]], *, max_tokens: int, seed: int, epoch: int, drop_overlong: bool = False
) -> list[list[int]]:
    """One epoch's batches of dataset indices: length-bucketed, each within max_tokens, shuffled.

    Ties in length are broken randomly, so batch contents as well as their order change between epochs;
    both are fixed by (seed, epoch).
    """
    array = _as_array(lengths)
    kept = _kept_indices(array, max_tokens, drop_overlong)
    rng = np.random.default_rng([seed, epoch])
    tiebreak = rng.permutation(len(kept))
    keys = _single_costs(array[kept])
    order = kept[np.lexsort((tiebreak, array[kept, 0], keys))]
    batches = _cut(order, _single_costs(array[order]), max_tokens)
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_sorted(lengths: Sequence[tuple[int, int]], *, max_tokens: int, drop_overlong: bool = False) -> list[list[int]]:
    """Batches in ascending length order with no randomness: for validation loss and for translating a
    file quickly (restore the input order afterwards with each Batch's `indices`)."""
    array = _as_array(lengths)
    kept = _kept_indices(array, max_tokens, drop_overlong)
    order = kept[np.lexsort((kept, array[kept, 0], _single_costs(array[kept])))]
    return _cut(order, _single_costs(array[order]), max_tokens)


def shard(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank r's share for data parallelism: every world_size-th batch, the tail trimmed so that every
    rank runs the same number of steps (a rank with one batch fewer would hang the others' all-reduce)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    usable = len(batches) - len(batches) % world_size
    return list(batches[rank:usable:world_size])


def _cut(order: np.ndarray, sorted_costs: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Greedy cut of length-sorted indices: since costs ascend, a batch's cost is its size times the
    cost of its last pair, so each batch grows while (size + 1) * cost(next pair) fits."""
    batches: list[list[int]] = []
    indices, costs = order.tolist(), sorted_costs.tolist()
    start = 0
    for position, cost in enumerate(costs):
        if (position - start + 1) * cost > max_tokens:
            batches.append(indices[start:position])
            start = position
    if start < len(indices):
        batches.append(indices[start:])
    return batches


def _as_array(lengths: Sequence[tuple[int, int]]) -> np.ndarray:
    array = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
    if array.size and array.min() < 0:
        raise ValueError("sequence lengths must be non-negative")
    return array


def _single_costs(array: np.ndarray) -> np.ndarray:
    """Per-pair cost max(src + 1, tgt + 1): a batch's cost is its size times the largest of these."""
    return np.maximum(array[:, 0], array[:, 1]) + 1


def _kept_indices(array: np.ndarray, max_tokens: int, drop_overlong: bool) -> np.ndarray:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    over = _single_costs(array) > max_tokens
    if over.any() and not drop_overlong:
        dropped = np.flatnonzero(over)
        first = ", ".join(str(i) for i in dropped[:5].tolist())
        raise OverlongPairsError(
            f"{len(dropped)} pair(s) need more than max_tokens={max_tokens} on their own (indices {first}"
            f"{', ...' if len(dropped) > 5 else ''}); raise max_tokens or drop them (drop_overlong=True)"
        )
    return np.flatnonzero(~over)


class BatchStream:
    """Endless, resumable training batches: yields (epoch, index_in_epoch, Batch) for this rank.

    Iterate with one loop at a time: the position lives on the stream, so that `state_dict()` taken
    after a batch was consumed names the next batch, and `load_state_dict` on a fresh stream built from
    the same data and seed continues from there. Plans are recomputed from (seed, epoch) on demand.
    """

    def __init__(
        self,
        pairs: EncodedPairs | Sequence[Pair],
        *,
        max_tokens: int,
        seed: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        drop_overlong: bool = False,
    ) -> None:
        if len(pairs) == 0:
            raise ValueError("BatchStream needs at least one pair")
        self.pairs = as_encoded(pairs)
        self.lengths = self.pairs.lengths_R2
        self.max_tokens, self.seed = max_tokens, seed
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.rank, self.world_size = rank, world_size
        self.drop_overlong = drop_overlong
        self.dropped = filter_overlong(self.lengths, max_tokens)[1]
        if len(self.dropped) == len(self.pairs):  # else: "0 batches, fewer than world_size; lower max_tokens"
            shortest = int(_single_costs(_as_array(self.lengths)).min())
            raise OverlongPairsError(
                f"every pair needs more than max_tokens={max_tokens} on its own (the shortest needs {shortest}); "
                "raise max_tokens"
            )
        self.epoch, self.index = 0, 0
        self.plan(0)  # fail now, not at the first step, on overlong pairs or too few batches

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of dataset indices) for `epoch`."""
        batches = plan_batches(
            self.lengths, max_tokens=self.max_tokens, seed=self.seed, epoch=epoch, drop_overlong=self.drop_overlong
        )
        mine = shard(batches, self.rank, self.world_size)
        if not mine:
            raise ValueError(
                f"the data makes {len(batches)} batch(es) of max_tokens={self.max_tokens}, fewer than "
                f"world_size={self.world_size}; lower max_tokens or use fewer processes"
            )
        return mine

    def global_batches(self, epoch: int) -> int:
        """How many batches `epoch`'s plan has over all ranks, the tail that `shard` trims included."""
        return len(
            plan_batches(
                self.lengths, max_tokens=self.max_tokens, seed=self.seed, epoch=epoch, drop_overlong=self.drop_overlong
            )
        )

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        while True:
            batches = self.plan(self.epoch)
            while self.index < len(batches):
                index = self.index
                batch = collate(self.pairs, batches[index], pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id)
                self.index += 1
                yield self.epoch, index, batch
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"invalid batch stream state {state}")
        self.epoch, self.index = epoch, index


def sorted_batches(
    pairs: EncodedPairs | Sequence[Pair],
    *,
    max_tokens: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    drop_overlong: bool = False,
) -> list[Batch]:
    """All pairs once, length-sorted and unshuffled: a fixed set of batches for validation loss."""
    encoded = as_encoded(pairs)
    plan = plan_sorted(encoded.lengths_R2, max_tokens=max_tokens, drop_overlong=drop_overlong)
    return [collate(encoded, chosen, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id) for chosen in plan]


def as_encoded(pairs: EncodedPairs | Sequence[Pair]) -> EncodedPairs:
    """Pairs in flat arrays, converted once from lists of ids if they are not already."""
    return pairs if isinstance(pairs, EncodedPairs) else EncodedPairs.from_pairs(pairs)
