"""Key/value cache for incremental (one token at a time) decoding.

Decoder self-attention keys and values are written into buffers preallocated for the longest output,
so a step costs one small write instead of recomputing or concatenating the whole prefix.
Cross-attention keys and values depend only on the source, so they are computed once and kept, one
row per memory entry (a sentence); the decoder's rows may be a multiple n of them, n adjacent rows (a
sentence's beams) sharing one (see `CrossAttention`).

`DecoderCache.reorder` moves hypotheses by index (beam search with attention maps; without them it uses
the `BeamDecoderCache` below): an index_select of the *filled* positions only, written into a second
preallocated buffer that then becomes the live one (double buffering), so a step never allocates and
never copies the empty tail. Beams never change sentence, so the memory is not reordered.
`select` drops or duplicates whole rows (finished sentences leaving the batch, a sentence's first row
becoming its beams) and reallocates; `select_memory` keeps the memory entries of the sentences that stay.

`BeamDecoderCache` is beam search's cache that is never reordered: each beam's keys and values stay in
its own slot of its sentence, an ancestry table says which slot holds each position of each beam's
history, and attention masks by it (so a reorder moves a small integer table, not the cache).

`StaticDecoderCache` is the fixed-shape variant for a decoding step that is captured once and replayed
(a CUDA graph): its tensors never move or change shape, the position of the next token is a tensor on
the device that the step itself advances, and every step attends over all `capacity` positions with a
mask that hides the ones not yet written. It cannot refuse a step past its capacity itself: that would
read the device's position on the host, a synchronisation inside the step a CUDA graph records. Its
driver counts steps on the host instead (`StaticStepDecoder.check_room`). `StaticBeamDecoderCache` is
the same for beam search, with the beam cache's slots and ancestry table (a reorder moves the table,
never the keys and values).

Shape legend: B batch (sentences x beams; in the beam caches, sentences), N beams, n the query rows of a
sentence (N, or 1 in the beam cache's first step), H heads, L cache capacity, T positions (those written by
`append`, those so far, or all L), P filled positions x beams, S source length, K head dim, R rows, M memory
entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class CacheLayout:
    """What every decoder cache is sized by: the decoder's depth and heads, the longest output, dtype, device."""

    n_layers: int
    n_heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype
    device: torch.device

    def key_value_buffers(self, shape: tuple[int, ...], *, zeros: bool = False) -> list[tuple[Tensor, Tensor]]:
        """One (keys, values) pair of `shape` per layer, uninitialised or zeroed."""
        make = torch.zeros if zeros else torch.empty
        return [
            (make(shape, dtype=self.dtype, device=self.device), make(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.n_layers)
        ]


@dataclass
class LayerCache:
    """Self-attention keys and values of one decoder layer, filled up to `length`."""

    k_BHLK: Tensor
    v_BHLK: Tensor
    length: int = 0
    spare_k_BHLK: Tensor | None = None  # the second buffer of the double-buffered reorder
    spare_v_BHLK: Tensor | None = None

    def append(self, k_BHTK: Tensor, v_BHTK: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions and return keys and values of every position so far."""
        end = self.length + k_BHTK.shape[2]
        if end > self.k_BHLK.shape[2]:
            raise ValueError(f"decoder cache holds {self.k_BHLK.shape[2]} positions; asked for {end}")
        self.k_BHLK[:, :, self.length : end] = k_BHTK
        self.v_BHLK[:, :, self.length : end] = v_BHTK
        self.length = end
        return self.k_BHLK[:, :, :end], self.v_BHLK[:, :, :end]

    def reorder(self, indices_B: Tensor) -> None:
        """Row i takes what row indices_B[i] had, for the filled positions, without allocating."""
        if self.spare_k_BHLK is None or self.spare_v_BHLK is None:
            self.spare_k_BHLK = torch.empty_like(self.k_BHLK)
            self.spare_v_BHLK = torch.empty_like(self.v_BHLK)
        n = self.length
        torch.index_select(self.k_BHLK[:, :, :n], 0, indices_B, out=self.spare_k_BHLK[:, :, :n])
        torch.index_select(self.v_BHLK[:, :, :n], 0, indices_B, out=self.spare_v_BHLK[:, :, :n])
        self.k_BHLK, self.spare_k_BHLK = self.spare_k_BHLK, self.k_BHLK
        self.v_BHLK, self.spare_v_BHLK = self.spare_v_BHLK, self.v_BHLK

    def select(self, indices_B: Tensor) -> None:
        """Keep rows indices_B (any number of them), in fresh buffers of the new batch size."""
        k_BHLK = self.k_BHLK.new_empty((len(indices_B), *self.k_BHLK.shape[1:]))
        v_BHLK = torch.empty_like(k_BHLK)
        n = self.length
        k_BHLK[:, :, :n] = self.k_BHLK[:, :, :n].index_select(0, indices_B)
        v_BHLK[:, :, :n] = self.v_BHLK[:, :, :n].index_select(0, indices_B)
        self.k_BHLK, self.v_BHLK = k_BHLK, v_BHLK
        self.spare_k_BHLK = self.spare_v_BHLK = None


@dataclass
class DecoderCache:
    """Everything a decoder needs to continue from the tokens it has already seen."""

    layers: list[LayerCache]
    memory_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, layout: CacheLayout, *, batch_size: int) -> DecoderCache:
        shape = (batch_size, layout.n_heads, layout.capacity, layout.head_dim)
        return cls(layers=[LayerCache(k, v) for k, v in layout.key_value_buffers(shape)])

    @property
    def length(self) -> int:
        """How many target positions have been decoded (the position of the next token)."""
        return self.layers[0].length

    def reorder(self, indices_B: Tensor) -> None:
        """Keep, for row i of the batch, what row indices_B[i] had (beam search's reordering, always a row
        of the same sentence, so the memory stays as it is)."""
        if len(indices_B) != self.layers[0].k_BHLK.shape[0]:
            self.select(indices_B)
            return
        for layer in self.layers:
            layer.reorder(indices_B)

    def select(self, indices_B: Tensor) -> None:
        """Keep rows indices_B of the self-attention keys/values; the batch size may change."""
        for layer in self.layers:
            layer.select(indices_B)

    def select_memory(self, indices_M: Tensor) -> None:
        """Keep memory entries indices_M (the sentences that stay in the batch)."""
        self.memory_kv = [(k.index_select(0, indices_M), v.index_select(0, indices_M)) for k, v in self.memory_kv]


@dataclass
class StepWindow:
    """The positions a step of a fixed-shape cache attends over, shared by the cache and its layers. On a GPU
    all `capacity` of them, the shape a CUDA graph records once for every step (`positions_T` None). On the
    CPU, where no graph is recorded, the driver sets `positions_T` before each step to the positions written
    so far (a view of 0 .. t, `show`): the step then reads only their keys and values, as the default step
    does, and torch.compile makes their number a symbol (one compiled step for every length)."""

    positions_T: Tensor | None = None

    def show(self, key_positions_L: Tensor, positions: int) -> None:
        """The next step reads only the first `positions` of the cache's positions (on the CPU: those written
        so far, the new one included). At least two where there are: a window of one position would be a
        size torch.compile never makes a symbol (a compilation of its own for every first step); the second
        is masked as not yet written."""
        self.positions_T = key_positions_L[: max(positions, 2)]

    def positions(self, key_positions_L: Tensor) -> Tensor:
        """The positions the next step reads: those `show` named, else all of the cache's."""
        return key_positions_L if self.positions_T is None else self.positions_T


@dataclass
class StaticLayerCache:
    """Self-attention keys and values of one decoder layer, at fixed addresses and full capacity."""

    k_BHLK: Tensor
    v_BHLK: Tensor
    position_1: Tensor  # shared with the StaticDecoderCache: where the next token's key and value go
    window: StepWindow  # shared with the StaticDecoderCache: the positions a step reads

    def append(self, k_BH1K: Tensor, v_BH1K: Tensor) -> tuple[Tensor, Tensor]:
        """Write the one new position at `position_1` and return the buffers' positions of the step's window
        (the whole buffers on a GPU; the decoder's `StaticDecoderCache.start_step` mask hides the positions
        not yet written)."""
        self.k_BHLK.index_copy_(2, self.position_1, k_BH1K)
        self.v_BHLK.index_copy_(2, self.position_1, v_BH1K)
        if self.window.positions_T is None:
            return self.k_BHLK, self.v_BHLK
        T = self.window.positions_T.shape[0]
        return self.k_BHLK[:, :, :T], self.v_BHLK[:, :, :T]


@dataclass
class StaticDecoderCache:
    """A decoder cache whose tensors keep their addresses and shapes for a whole search (greedy
    decoding and sampling: rows never change places; beam search uses `StaticBeamDecoderCache`)."""

    layers: list[StaticLayerCache]
    position_1: Tensor  # (1,) long: the position of the next token, advanced in place by each step
    key_positions_L: Tensor  # 0 .. L-1
    window: StepWindow  # shared with the layers: the positions a step reads (all, unless `show` says)
    memory_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, layout: CacheLayout, *, batch_size: int) -> StaticDecoderCache:
        shape = (batch_size, layout.n_heads, layout.capacity, layout.head_dim)
        position_1 = torch.zeros(1, dtype=torch.long, device=layout.device)
        window = StepWindow()
        buffers = layout.key_value_buffers(shape, zeros=True)
        layers = [StaticLayerCache(k, v, position_1, window) for k, v in buffers]
        key_positions_L = torch.arange(layout.capacity, device=layout.device)
        return cls(layers=layers, position_1=position_1, key_positions_L=key_positions_L, window=window)

    def show(self, positions: int) -> None:
        """The next step reads only the first `positions` positions, not the whole capacity (StepWindow)."""
        self.window.show(self.key_positions_L, positions)

    @property
    def capacity(self) -> int:
        return self.key_positions_L.shape[0]

    def buffers(self) -> list[Tensor]:
        """Every tensor a step writes: the position, each layer's keys and values."""
        return [self.position_1, *(t for layer in self.layers for t in (layer.k_BHLK, layer.v_BHLK))]

    def start_step(self) -> Tensor:
        """(1, 1, 1, T) "may attend" mask of the new token over the step's window of T positions (all L, or
        those `show` names): every position up to its own."""
        positions_T = self.window.positions(self.key_positions_L)
        return (positions_T <= self.position_1)[None, None, None, :]

    def advance(self) -> None:
        self.position_1.add_(1)


def ancestors_mask(ancestry_BnT: Tensor, slots_N: Tensor) -> Tensor:
    """The (B, 1, n, T x N) "may attend" mask of n beams' queries over their sentence's keys of T positions
    x N slots, position-major: at position p, beam i sees only the slot ancestry_BnT[b, i, p] (the beam
    caches' ancestry table)."""
    B, n, T = ancestry_BnT.shape
    return (ancestry_BnT[:, :, :, None] == slots_N).view(B, 1, n, T * slots_N.shape[0])


def reordered_ancestry(ancestry_BNT: Tensor, indices_R: Tensor) -> Tensor:
    """The ancestry table after a reorder: row i (beam i % N of sentence i // N) continues the history of
    row indices_R[i], a row of the same sentence, so it takes that beam's slots."""
    B, N, T = ancestry_BNT.shape
    return ancestry_BNT.gather(1, (indices_R.view(B, N) % N)[:, :, None].expand(B, N, T))


@dataclass
class StaticBeamLayerCache:
    """`BeamLayerCache` at fixed addresses and full capacity: beam j of sentence b writes the key and value
    of position p at [b, :, p, j], p being the device's `position_1`."""

    k_BHLNK: Tensor
    v_BHLNK: Tensor
    position_1: Tensor  # shared with the StaticBeamDecoderCache
    window: StepWindow  # shared with the StaticBeamDecoderCache: the positions a step reads

    def append(self, k_RH1K: Tensor, v_RH1K: Tensor) -> tuple[Tensor, Tensor]:
        """Write each beam's new key and value (R = B x N rows) into its own slot and return every
        sentence's keys and values of the step's window of T positions (the whole capacity L on a GPU),
        (B, H, T x N, K), position-major (the decoder's `StaticBeamDecoderCache.start_step` mask picks each
        beam's ancestors among them)."""
        B, H, L, N, K = self.k_BHLNK.shape
        self.k_BHLNK.index_copy_(2, self.position_1, k_RH1K.reshape(B, N, H, 1, K).permute(0, 2, 3, 1, 4))
        self.v_BHLNK.index_copy_(2, self.position_1, v_RH1K.reshape(B, N, H, 1, K).permute(0, 2, 3, 1, 4))
        if self.window.positions_T is None:
            return self.k_BHLNK.view(B, H, L * N, K), self.v_BHLNK.view(B, H, L * N, K)
        T = self.window.positions_T.shape[0]
        return self.k_BHLNK[:, :, :T].reshape(B, H, T * N, K), self.v_BHLNK[:, :, :T].reshape(B, H, T * N, K)


@dataclass
class StaticBeamDecoderCache:
    """Beam search's fixed-shape cache: `BeamDecoderCache`'s never-moved keys and values and ancestry
    table, at fixed addresses and full capacity, with the position on the device (`StaticDecoderCache`).

    A reorder gathers the small ancestry table (B x N x L integers) instead of copying every layer's keys
    and values of every row (on a GPU, that copy was a sixth of a `base` beam-4 step). Each step attends
    over all L x N keys of a sentence, masked to the beam's ancestors at the positions written so far.
    Entries past the position (a previous batch's) are never read: the mask hides them until this batch's
    step at that position overwrites them."""

    layers: list[StaticBeamLayerCache]
    position_1: Tensor  # (1,) long: the position of the next token, advanced in place by each step
    key_positions_L: Tensor  # 0 .. L-1
    ancestry_BNL: Tensor  # long: the beam slot holding each position of each beam's history
    slots_N: Tensor  # 0 .. N-1
    window: StepWindow  # shared with the layers: the positions a step reads (all, unless `show` says)
    memory_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, layout: CacheLayout, *, sentences: int, beams: int) -> StaticBeamDecoderCache:
        shape = (sentences, layout.n_heads, layout.capacity, beams, layout.head_dim)
        position_1 = torch.zeros(1, dtype=torch.long, device=layout.device)
        window = StepWindow()
        buffers = layout.key_value_buffers(shape, zeros=True)
        return cls(
            layers=[StaticBeamLayerCache(k, v, position_1, window) for k, v in buffers],
            position_1=position_1,
            key_positions_L=torch.arange(layout.capacity, device=layout.device),
            ancestry_BNL=torch.zeros((sentences, beams, layout.capacity), dtype=torch.long, device=layout.device),
            slots_N=torch.arange(beams, device=layout.device),
            window=window,
        )

    def show(self, positions: int) -> None:
        """The next step reads only the first `positions` positions, not the whole capacity (StepWindow)."""
        self.window.show(self.key_positions_L, positions)

    @property
    def capacity(self) -> int:
        return self.key_positions_L.shape[0]

    def buffers(self) -> list[Tensor]:
        """Every tensor a step writes: the position, the ancestry table, each layer's keys and values."""
        layers = (t for layer in self.layers for t in (layer.k_BHLNK, layer.v_BHLNK))
        return [self.position_1, self.ancestry_BNL, *layers]

    def start_step(self) -> Tensor:
        """Mark the new position as each beam's own slot and return the (B, 1, N, T x N) "may attend" mask
        of each sentence's N queries over its keys of the step's window of T positions (all L, or those
        `show` names): a beam's ancestor's slot at every position so far."""
        N = self.slots_N.shape[0]
        new_L = self.key_positions_L == self.position_1
        self.ancestry_BNL.copy_(torch.where(new_L, self.slots_N[:, None], self.ancestry_BNL))
        positions_T = self.window.positions(self.key_positions_L)
        written_P = (positions_T <= self.position_1).repeat_interleave(N)  # P = T x N, position-major
        return ancestors_mask(self.ancestry_BNL[:, :, : positions_T.shape[0]], self.slots_N) & written_P

    def advance(self) -> None:
        self.position_1.add_(1)

    def reorder(self, indices_R: Tensor) -> None:
        """Row i (beam i % N of sentence i // N) continues the history of row indices_R[i], a row of the
        same sentence: only the ancestry table moves, copied back into the same storage."""
        self.ancestry_BNL.copy_(reordered_ancestry(self.ancestry_BNL, indices_R))


@dataclass
class BeamLayerCache:
    """Self-attention keys and values of one decoder layer for beam search, never moved: beam j of
    sentence b writes position p at [b, :, p, j]. Positions come first, so the filled part of a sentence
    is one contiguous block of (length x N) keys that all its beams' queries read at once."""

    k_BHLNK: Tensor
    v_BHLNK: Tensor
    length: int = 0

    def append(self, k_RHTK: Tensor, v_RHTK: Tensor) -> tuple[Tensor, Tensor]:
        """Write each beam's key and value of the new position (R = B x N rows, one position; or R = B,
        one row per sentence, written to all its slots: the first step, when every beam is the same) and
        return every sentence's keys and values so far, (B, H, P, K) with P = length x N, position-major."""
        B, H, L, N, K = self.k_BHLNK.shape
        t = self.length
        if k_RHTK.shape[2] != 1:
            raise ValueError("a beam cache takes one position per step")
        if t >= L:
            raise ValueError(f"decoder cache holds {L} positions; asked for {t + 1}")
        n = k_RHTK.shape[0] // B  # N, or 1 (broadcast to every slot)
        self.k_BHLNK[:, :, t] = k_RHTK.view(B, n, H, K).transpose(1, 2)
        self.v_BHLNK[:, :, t] = v_RHTK.view(B, n, H, K).transpose(1, 2)
        self.length = t + 1
        return (
            self.k_BHLNK[:, :, : t + 1].reshape(B, H, (t + 1) * N, K),
            self.v_BHLNK[:, :, : t + 1].reshape(B, H, (t + 1) * N, K),
        )

    def select(self, sentences_B: Tensor) -> None:
        self.k_BHLNK = self.k_BHLNK.index_select(0, sentences_B)
        self.v_BHLNK = self.v_BHLNK.index_select(0, sentences_B)


@dataclass
class BeamDecoderCache:
    """A decoder cache for beam search that reorders beams without copying keys and values.

    Beam search's reorder (row i continues the history of row parent(i)) would copy every layer's keys
    and values of every filled position at every step. Here they stay where they were written, and
    `ancestry_BNL[b, i, p]` records which beam slot holds position p of beam i's history; a reorder
    only gathers that small integer table. Each step, beam i's query attends to its sentence's keys of
    all slots, masked to the slot of its own ancestor at each position (`start_step`): the same keys and
    values as a reordered cache, at the cost of N times more (tiny) attention products instead of
    copying the cache. Memory keys/values are one entry per sentence, as in `DecoderCache`.
    """

    layers: list[BeamLayerCache]
    ancestry_BNL: Tensor  # long: the beam slot holding each position of each beam's history
    memory_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, layout: CacheLayout, *, sentences: int, beams: int) -> BeamDecoderCache:
        shape = (sentences, layout.n_heads, layout.capacity, beams, layout.head_dim)
        layers = [BeamLayerCache(k, v) for k, v in layout.key_value_buffers(shape)]
        ancestry_BNL = torch.zeros((sentences, beams, layout.capacity), dtype=torch.long, device=layout.device)
        return cls(layers=layers, ancestry_BNL=ancestry_BNL)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def start_step(self, rows: int) -> Tensor:
        """Mark the new position as each beam's own slot and return the (B, 1, n, P) "may attend" mask of
        the n = rows / B queries of each sentence (N, or 1 in the first step: beam 0 stands for all) over
        the P = (length + 1) x N keys of their sentence."""
        B, N, _ = self.ancestry_BNL.shape
        t = self.length
        slots_N = torch.arange(N, device=self.ancestry_BNL.device)
        self.ancestry_BNL[:, :, t] = slots_N
        return ancestors_mask(self.ancestry_BNL[:, : rows // B, : t + 1], slots_N)

    def reorder(self, indices_R: Tensor) -> None:
        """Row i (beam i % N of sentence i // N) continues the history of row indices_R[i], a row of the
        same sentence: only the ancestry table moves."""
        t = self.length
        self.ancestry_BNL[:, :, :t] = reordered_ancestry(self.ancestry_BNL[:, :, :t], indices_R)

    def select(self, indices_R: Tensor) -> None:
        """Keep rows indices_R: whole sentences (all N rows of each, in order), as when they leave."""
        N = self.ancestry_BNL.shape[1]
        sentences_B = indices_R[::N] // N
        for layer in self.layers:
            layer.select(sentences_B)
        self.ancestry_BNL = self.ancestry_BNL.index_select(0, sentences_B)

    def select_memory(self, indices_M: Tensor) -> None:
        self.memory_kv = [(k.index_select(0, indices_M), v.index_select(0, indices_M)) for k, v in self.memory_kv]
