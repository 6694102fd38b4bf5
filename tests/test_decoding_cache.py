"""The KV cache: reorder moves the filled positions by index (double-buffered), select resizes the batch."""

from __future__ import annotations

import pytest
import torch

from tformer.model import Transformer
from tformer.model.cache import CacheLayout, DecoderCache


def filled_cache(batch: int = 4, length: int = 3) -> DecoderCache:
    layout = CacheLayout(n_layers=2, n_heads=2, head_dim=3, capacity=8, dtype=torch.float32, device=torch.device("cpu"))
    cache = DecoderCache.allocate(layout, batch_size=batch)
    for layer in cache.layers:
        layer.append(torch.randn(batch, 2, length, 3), torch.randn(batch, 2, length, 3))
    cache.memory_kv = [(torch.randn(batch, 2, 5, 3), torch.randn(batch, 2, 5, 3)) for _ in range(2)]
    return cache


def test_reorder_moves_filled_positions_and_keeps_memory():
    cache = filled_cache()
    before = [(layer.k_BHLK[:, :, :3].clone(), layer.v_BHLK[:, :, :3].clone()) for layer in cache.layers]
    memory_before = [k.clone() for k, _ in cache.memory_kv]
    index = torch.tensor([2, 2, 0, 1])
    for _ in range(2):  # twice, so both buffers of the double buffer are exercised
        cache.reorder(index)
        before = [(k[index], v[index]) for k, v in before]
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        torch.testing.assert_close(layer.k_BHLK[:, :, :3], k, rtol=0, atol=0)
        torch.testing.assert_close(layer.v_BHLK[:, :, :3], v, rtol=0, atol=0)
    assert all(torch.equal(k, m) for (k, _), m in zip(cache.memory_kv, memory_before, strict=True))
    appended_k, _ = cache.layers[0].append(torch.ones(4, 2, 1, 3), torch.ones(4, 2, 1, 3))
    assert appended_k.shape[2] == 4 and cache.length == 4


def test_select_changes_the_batch_size_and_select_memory_keeps_entries():
    cache = filled_cache()
    keep = torch.tensor([3, 1])
    expected = cache.layers[1].k_BHLK[keep, :, :3].clone()
    memory_expected = cache.memory_kv[0][0][keep].clone()
    cache.select(keep)
    assert cache.layers[1].k_BHLK.shape[0] == 2 and cache.memory_kv[0][0].shape[0] == 4  # memory: its own call
    torch.testing.assert_close(cache.layers[1].k_BHLK[:, :, :3], expected, rtol=0, atol=0)
    cache.select_memory(keep)
    assert torch.equal(cache.memory_kv[0][0], memory_expected)
    cache.reorder(torch.tensor([1, 1]))  # reorder works on the new size
    torch.testing.assert_close(cache.layers[1].k_BHLK[:, :, :3], expected[[1, 1]], rtol=0, atol=0)


def test_a_decode_step_of_another_batch_is_refused_before_it_changes_the_cache(tiny_model: Transformer) -> None:
    """One row of tokens for a cache of two was written into both rows (broadcast) and moved the cache a
    position on before the cross-attention refused it: the caller's next, right, steps read that."""
    src_BS = torch.randint(3, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    tgt_BT = torch.randint(3, 40, (2, 4), generator=torch.Generator().manual_seed(1))
    expected_BTV = tiny_model(src_BS, tgt_BT)
    cache = tiny_model.new_cache(batch_size=2, capacity=8, memory=tiny_model.encode(src_BS))
    with pytest.raises(ValueError, match=r"^tgt_ids has 1 rows but the cache 2: give one row per cache row$"):
        tiny_model.decode(tgt_BT[:1, :1], memory=None, src_pad_mask=None, cache=cache)
    assert cache.length == 0
    steps = [tiny_model.decode(tgt_BT[:, t : t + 1], memory=None, src_pad_mask=None, cache=cache) for t in range(4)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected_BTV)
    three = tiny_model.new_cache(batch_size=3, capacity=8)
    with pytest.raises(ValueError, match=r"^tgt_ids has 3 rows, not a multiple of the memory's 2$"):
        tiny_model.decode(
            torch.ones(3, 1, dtype=torch.long), memory=tiny_model.encode(src_BS), src_pad_mask=None, cache=three
        )
    assert three.length == 0
