"""Decoding with several models at once: the average of their log-probabilities.

`EnsembleModel(models)` exposes the surface decoding uses (`encode`, `project_memory`, `new_cache`,
`decode`, `config`), so every search works on it unchanged. Its `decode` returns, in place of logits,
mean_m log_softmax(logits_m); the search's own log_softmax then renormalises that (a normalised
geometric mean of the models' distributions). With `return_attention` the attention lists hold one
entry: each member's last layer, averaged over its heads, then over the members. The models must share
the source and target vocabularies and the pad id; they may differ in shape.

Shape legend: B batch, T target length, V vocabulary, M memory entries (one per sentence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.decoding.search_types import DecodingError


class EnsembleCache:
    """One decoder cache per model, reordered together."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    @property
    def memory_kv(self) -> list[Any]:
        return [cache.memory_kv for cache in self.caches]

    @memory_kv.setter
    def memory_kv(self, values: list[Any]) -> None:
        for cache, value in zip(self.caches, values, strict=True):
            cache.memory_kv = value

    @property
    def length(self) -> int:
        return self.caches[0].length

    def reorder(self, indices_B: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(indices_B)

    def select(self, indices_B: Tensor) -> None:
        for cache in self.caches:
            cache.select(indices_B)

    def select_memory(self, indices_M: Tensor) -> None:
        for cache in self.caches:
            cache.select_memory(indices_M)


class EnsembleModel(nn.Module):
    """Several encoder-decoder models decoded as one."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise DecodingError("an ensemble needs at least one model")
        # the ensemble checks source ids (and makes a missing source mask) with its first member's config:
        # a member with a smaller source vocabulary met an out-of-range id deep inside its embedding
        for field, what in (
            ("tgt_vocab_size", "the target vocabulary size"),
            ("src_vocab_size", "the source vocabulary size"),
            ("pad_id", "the pad id"),
        ):
            values = {getattr(model.config, field) for model in models}
            if len(values) != 1:
                raise DecodingError(f"ensemble members disagree on {what}: {sorted(values)}")
        self.models = nn.ModuleList(models)
        # the shortest member bounds the output length
        self.config = dataclasses.replace(
            models[0].config, max_positions=min(model.config.max_positions for model in models)
        )

    @property
    def training(self) -> bool:
        """In training mode (dropout on) while any member is, asked each time: a member may be switched
        after the ensemble is built, and decoding must then refuse it as it refuses that member alone."""
        members = self.__dict__.get("_modules", {}).get("models")
        return members is not None and any(model.training for model in members)

    @training.setter
    def training(self, mode: bool) -> None:
        """nn.Module sets the flag in __init__ and train(); the members' own flags are what count (train()
        and eval() pass the mode on to them)."""

    def encode(self, src_ids: Tensor, *, src_pad_mask: Tensor | None = None) -> list[Tensor]:
        return [model.encode(src_ids, src_pad_mask=src_pad_mask) for model in self.models]

    def project_memory(self, memories: list[Tensor]) -> list[Any]:
        return [model.project_memory(memory) for model, memory in zip(self.models, memories, strict=True)]

    def new_cache(self, *, batch_size: int, capacity: int) -> EnsembleCache:
        return EnsembleCache([model.new_cache(batch_size=batch_size, capacity=capacity) for model in self.models])

    def new_beam_cache(self, *, sentences: int, beams: int, capacity: int) -> EnsembleCache:
        return EnsembleCache(
            [model.new_beam_cache(sentences=sentences, beams=beams, capacity=capacity) for model in self.models]
        )

    def decode(
        self,
        tgt_ids: Tensor,
        *,
        memory: list[Tensor] | None,
        src_pad_mask: Tensor | None,
        cache: EnsembleCache | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor], list[Tensor]]:
        """Mean log-probabilities (B, T, V) in place of logits, and averaged attention if asked."""
        outputs = [
            model.decode(
                tgt_ids,
                memory=None if memory is None else memory[index],
                src_pad_mask=src_pad_mask,
                cache=None if cache is None else cache.caches[index],
                return_attention=return_attention,
            )
            for index, model in enumerate(self.models)
        ]
        logits = [output[0] if return_attention else output for output in outputs]
        mean_log_probs_BTV = torch.stack([F.log_softmax(item.float(), dim=-1) for item in logits]).mean(dim=0)
        if not return_attention:
            return mean_log_probs_BTV
        # members may differ in depth and heads: one entry, each member's last layer averaged over its heads
        self_weights = torch.stack([o[1][-1].mean(dim=1, keepdim=True) for o in outputs]).mean(dim=0)
        cross_weights = torch.stack([o[2][-1].mean(dim=1, keepdim=True) for o in outputs]).mean(dim=0)
        return mean_log_probs_BTV, [self_weights], [cross_weights]
