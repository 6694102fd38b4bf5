"""Encoded sentences in flat arrays: the training corpus as the batcher reads it.

A corpus held as Python lists of token ids costs an int object and a pointer per token: a million
pairs of ~15 pieces took 814 MB (tracemalloc), and the paper's WMT 2014 En-De (4.5 million pairs of
~30 pieces) would take ~7 GB in every process of a torchrun job. Here each side is two arrays,

    ids_N       every sentence's token ids back to back (uint16 when every id fits, else int32)
    offsets_R1  int64, R + 1 entries: sentence r is ids_N[offsets_R1[r] : offsets_R1[r + 1]]

about 2 bytes a token, which can also be saved and memory-mapped (`tformer.training.encoded_cache`).
Encoding goes chunk by chunk, so the lists of one chunk are the most that ever exist at once.

Shape legend: N tokens of all sentences, R sentences (rows), B rows of a batch, L longest row of a batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ENCODE_CHUNK = 65_536  # sentences encoded per call into sentencepiece (its lists are freed after each)

Encode = Callable[[Sequence[str]], list[list[int]]]


@dataclass(frozen=True)
class TokenRows:
    """Token ids of R sentences in two flat arrays (see the module docstring)."""

    ids_N: np.ndarray
    offsets_R1: np.ndarray

    def __post_init__(self) -> None:
        if self.offsets_R1.ndim != 1 or len(self.offsets_R1) < 1 or self.offsets_R1[0] != 0:
            raise ValueError("offsets must be a 1-d array starting at 0")
        if self.offsets_R1[-1] != len(self.ids_N):
            raise ValueError(f"offsets end at {self.offsets_R1[-1]} but there are {len(self.ids_N)} token ids")

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> TokenRows:
        lengths_R = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        offsets_R1 = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths_R, out=offsets_R1[1:])
        ids_N = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets_R1[-1]))
        if ids_N.size and ids_N.min() < 0:
            raise ValueError("token ids must be non-negative")
        return cls(ids_N.astype(id_dtype(int(ids_N.max()) if ids_N.size else 0)), offsets_R1)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenRows]) -> TokenRows:
        if not parts:
            return cls.from_lists([])
        ends = np.cumsum([0] + [len(part.ids_N) for part in parts[:-1]])
        offsets_R1 = np.concatenate([[0]] + [part.offsets_R1[1:] + end for part, end in zip(parts, ends, strict=True)])
        dtype = np.result_type(*(part.ids_N.dtype for part in parts))
        return cls(np.concatenate([part.ids_N for part in parts]).astype(dtype, copy=False), offsets_R1)

    def __len__(self) -> int:
        return len(self.offsets_R1) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.ids_N[self.offsets_R1[row] : self.offsets_R1[row + 1]]

    @property
    def lengths_R(self) -> np.ndarray:
        return np.diff(self.offsets_R1)

    def row_lengths(self, rows_B: np.ndarray) -> np.ndarray:
        return self.offsets_R1[rows_B + 1] - self.offsets_R1[rows_B]

    def keep(self, keep_R: np.ndarray) -> TokenRows:
        """The rows where `keep_R` (booleans) is True, in their order, in arrays of their own: chosen by a
        mask of one byte a token, where indices of the tokens to gather took several int64 arrays of a token
        each (2 million pairs: a peak of over 1 GB more than the corpus's own arrays)."""
        lengths_R = self.lengths_R[keep_R]
        offsets_R1 = np.zeros(len(lengths_R) + 1, dtype=np.int64)
        np.cumsum(lengths_R, out=offsets_R1[1:])
        return TokenRows(self.ids_N[np.repeat(keep_R, self.lengths_R)], offsets_R1)

    def padded(self, rows: Sequence[int] | np.ndarray, *, first: int | None, last: int | None, pad_id: int) -> Tensor:
        """The rows as one right-padded B x L int64 tensor, each with `first` put before its ids and `last`
        after them (None: nothing), in one gather instead of a Python loop over tokens."""
        rows_B = np.asarray(rows, dtype=np.int64)
        starts_B, lengths_B = self.offsets_R1[rows_B], self.row_lengths(rows_B)
        longest = int(lengths_B.max()) if len(rows_B) else 0
        shift = int(first is not None)
        out_BL = np.full((len(rows_B), longest + shift + int(last is not None)), pad_id, dtype=np.int64)
        columns_L = np.arange(longest)
        real_BL = columns_L < lengths_B[:, None]
        out_BL[:, shift : shift + longest][real_BL] = self.ids_N[(starts_B[:, None] + columns_L)[real_BL]]
        if first is not None:
            out_BL[:, 0] = first
        if last is not None:
            out_BL[np.arange(len(rows_B)), shift + lengths_B] = last
        return torch.from_numpy(out_BL)


@dataclass(frozen=True)
class EncodedPairs:
    """Aligned source and target sentences as token ids: pair i is (sources[i], targets[i])."""

    sources: TokenRows
    targets: TokenRows

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.targets):
            raise ValueError(f"{len(self.sources)} sources but {len(self.targets)} targets")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> EncodedPairs:
        return cls(TokenRows.from_lists([src for src, _ in pairs]), TokenRows.from_lists([tgt for _, tgt in pairs]))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sources[index], self.targets[index]

    @property
    def lengths_R2(self) -> np.ndarray:
        """(source length, target length) of every pair, without bos/eos."""
        return np.stack([self.sources.lengths_R, self.targets.lengths_R], axis=1)

    def keep(self, keep_R: np.ndarray) -> EncodedPairs:
        return EncodedPairs(self.sources.keep(keep_R), self.targets.keep(keep_R))


def id_dtype(largest_id: int) -> np.dtype:
    """The narrowest array type tformer stores ids of a vocabulary with this largest id in."""
    return np.dtype(np.uint16) if largest_id <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def encode_rows(encode: Encode, texts: Sequence[str], *, chunk: int = ENCODE_CHUNK) -> TokenRows:
    """`encode` (a tokenizer's batch encoder) over `texts`, `chunk` sentences at a time."""
    parts = [TokenRows.from_lists(encode(texts[start : start + chunk])) for start in range(0, len(texts), chunk)]
    return TokenRows.concatenate(parts)
