"""Scaled dot-product attention in three interchangeable forms, and multi-head attention.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V          (paper, eq. 1)

1. `attention_loop`: one query at a time, one key at a time, exactly as taught: a score q.k / sqrt(d_k)
   per key, a softmax over the scores, and the weighted sum of the value vectors.
2. `attention_matrix`: the same in matrix form; returns the weights so they can be plotted.
3. `attention_fused`: torch's `scaled_dot_product_attention` (flash / memory-efficient kernels),
   the default for training and inference.

All three take the boolean "may attend" mask of `tformer.model.masks` and agree to float64 precision
(tests/test_attention.py).

Shape legend: B batch, H heads, T query length, S key length, K head dim, D model dim; in `attend_rows`,
R query rows and M key rows (R = n x M: n beams of a sentence share its keys) and Q = n x T queries, those
of n rows folded over their one key row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.model.masks import additive_mask, causal_mask
from tformer.model.packed import Linear

FEW_QUERIES = 16  # on the CPU, at most this many folded queries use the matrix form (see `attend_rows`)


def attention_loop(q_BHTK: Tensor, k_BHSK: Tensor, v_BHSK: Tensor, mask: Tensor | None = None) -> Tensor:
    """The teaching form: loop over queries and keys, vectorised only over batch and heads."""
    return attention_loop_steps(q_BHTK, k_BHSK, v_BHSK, mask)[2]


def attention_loop_steps(
    q_BHTK: Tensor, k_BHSK: Tensor, v_BHSK: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`attention_loop` with its intermediate numbers: (scores_BHTS, weights_BHTS, output_BHTK).

    The scores include the mask (most negative finite value where a key may not be seen)."""
    B, H, T, K = q_BHTK.shape
    S = k_BHSK.shape[2]
    if v_BHSK.shape[2] != S or k_BHSK.shape[3] != K:  # the loop would weigh the first S values, or fail inside
        raise ValueError(
            f"keys {tuple(k_BHSK.shape)} must have the queries' head dim {K} and as many positions as the values "
            f"{tuple(v_BHSK.shape)}"
        )
    bias = additive_mask(mask, q_BHTK.dtype)
    bias_BHTS = None if bias is None else bias.expand(B, H, T, S)
    all_scores, all_weights, outputs = [], [], []
    for t in range(T):
        query_BHK = q_BHTK[:, :, t]
        scores = []
        for s in range(S):
            score_BH = (query_BHK * k_BHSK[:, :, s]).sum(dim=-1) / math.sqrt(K)
            if bias_BHTS is not None:
                score_BH = score_BH + bias_BHTS[:, :, t, s]
            scores.append(score_BH)
        scores_BHS = torch.stack(scores, dim=-1)
        # softmax, written out: subtract the max for stability, exponentiate, normalise
        exp_BHS = torch.exp(scores_BHS - scores_BHS.max(dim=-1, keepdim=True).values)
        weights_BHS = exp_BHS / exp_BHS.sum(dim=-1, keepdim=True)
        weighted_sum_BHK = sum(weights_BHS[:, :, s, None] * v_BHSK[:, :, s] for s in range(S))
        all_scores.append(scores_BHS)
        all_weights.append(weights_BHS)
        outputs.append(weighted_sum_BHK)
    return torch.stack(all_scores, dim=2), torch.stack(all_weights, dim=2), torch.stack(outputs, dim=2)


def attention_matrix(
    q_BHTK: Tensor,
    k_BHSK: Tensor,
    v_BHSK: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k) + mask) V, returning (output_BHTK, weights_BHTS)."""
    scores_BHTS = q_BHTK @ k_BHSK.transpose(-2, -1) / math.sqrt(q_BHTK.shape[-1])
    bias = additive_mask(mask, scores_BHTS.dtype)
    if bias is not None:
        scores_BHTS = scores_BHTS + bias
    weights_BHTS = torch.softmax(scores_BHTS, dim=-1)
    dropped_BHTS = F.dropout(weights_BHTS, p=dropout_p) if dropout_p > 0 else weights_BHTS
    return dropped_BHTS @ v_BHSK, weights_BHTS


def attention_fused(
    q_BHTK: Tensor,
    k_BHSK: Tensor,
    v_BHSK: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """torch's fused kernel. `is_causal` (with no mask) lets it pick the flash kernel for decoder
    self-attention; note that torch aligns it top-left, so it is only right when T == S."""
    return F.scaled_dot_product_attention(
        q_BHTK,
        k_BHSK,
        v_BHSK,
        attn_mask=additive_mask(mask, q_BHTK.dtype),
        dropout_p=dropout_p,
        is_causal=is_causal,
    )


def split_heads(x_BTD: Tensor, n_heads: int) -> Tensor:
    B, T, D = x_BTD.shape
    return x_BTD.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # B H T K


def merge_heads(x_BHTK: Tensor) -> Tensor:
    B, H, T, K = x_BHTK.shape
    return x_BHTK.transpose(1, 2).reshape(B, T, H * K)  # B T D


def attend(
    q_BHTK: Tensor,
    k_BHSK: Tensor,
    v_BHSK: Tensor,
    mask: Tensor | None,
    *,
    dropout_p: float,
    need_weights: bool,
    is_causal: bool = False,
    matrix_form: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The fused kernel, or the matrix form when the caller wants the weights back (or `matrix_form`).
    `is_causal` stands for the causal mask, so it takes no `mask` beside it (torch's kernel refuses both;
    the matrix form would drop the mask)."""
    if is_causal and mask is not None:
        raise ValueError("attend takes a mask or is_causal, not both: combine them into one mask")
    if need_weights or matrix_form:
        if is_causal:
            mask = causal_mask(q_BHTK.shape[2], k_BHSK.shape[2], device=q_BHTK.device)
        output, weights = attention_matrix(q_BHTK, k_BHSK, v_BHSK, mask, dropout_p=dropout_p)
        return output, weights if need_weights else None
    output = attention_fused(q_BHTK, k_BHSK, v_BHSK, mask, dropout_p=dropout_p, is_causal=is_causal)
    return output, None


def attend_rows(
    q_RHTK: Tensor,
    k_MHSK: Tensor,
    v_MHSK: Tensor,
    mask: Tensor | None,
    *,
    dropout_p: float,
    need_weights: bool,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`attend` where the R query rows may be n times the M key rows: n adjacent query rows (the beams
    of one sentence) share one row of keys and values, and their n x T queries are folded into one
    attention call over it (`mask` then has one row per key row, and n x T query positions if it has
    more than one). Each query's result is the one it would get from its own copy of the keys.
    Returns the heads merged, (R, T, D), and the weights (R, H, T, S) if asked for."""
    R, H, T, K = q_RHTK.shape
    M = k_MHSK.shape[0]
    if R % M != 0:
        raise ValueError(f"{R} query rows cannot share {M} key rows evenly")
    n = R // M
    if n == 1:
        output_RHTK, weights_RHTS = attend(
            q_RHTK, k_MHSK, v_MHSK, mask, dropout_p=dropout_p, need_weights=need_weights, is_causal=is_causal
        )
        return merge_heads(output_RHTK), weights_RHTS
    if is_causal:
        raise ValueError("folded query rows take an explicit mask, not is_causal")
    # Q = n x T queries per key row: (R, H, T, K) -> (R, T, H, K) -> (M, Q, H, K) -> (M, H, Q, K), a view
    # when the heads were split from a projection's output (as they are), so no copy on the way in
    q_MHQK = q_RHTK.transpose(1, 2).reshape(M, n * T, H, K).transpose(1, 2)
    # On the CPU the few folded queries of a decoding step take the matrix form: torch's fused kernel has
    # a fixed cost of ~100 us per call there, more than the work (4 beam queries over 32 memory keys in
    # each of 128 sentence x head pairs, on 2 cores: 274 us fused, 97 us as matrices; with a beam cache's
    # ancestry mask the gap is wider).
    few_cpu_queries = q_MHQK.device.type == "cpu" and n * T <= FEW_QUERIES
    output_MHQK, weights_MHQS = attend(
        q_MHQK, k_MHSK, v_MHSK, mask, dropout_p=dropout_p, need_weights=need_weights, matrix_form=few_cpu_queries
    )
    # unfold straight into the merged-heads layout: (M, H, n, T, K) -> (M, n, T, H, K) -> (R, T, D)
    output_RTD = output_MHQK.view(M, H, n, T, K).permute(0, 2, 3, 1, 4).reshape(R, T, H * K)
    weights_RHTS = None
    if weights_MHQS is not None:
        S = weights_MHQS.shape[-1]
        weights_RHTS = weights_MHQS.view(M, H, n, T, S).transpose(1, 2).reshape(R, H, T, S)
    return output_RTD, weights_RHTS


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused Q/K/V projection.

    `qkv_proj.weight` stacks the paper's W^Q, W^K and W^V of every head: rows [0, D) are the queries'
    (head h owns rows h*K .. h*K + K-1), then D rows for the keys and D for the values. `attend_rows`
    picks the fused kernel or the matrix form (see `attend`); either way it computes the textbook
    softmax(Q K^T / sqrt(d_k)) V of `attention_matrix` and `attention_loop` (tests/test_attention.py).

    With a `LayerCache` it appends the new keys and values and attends over all positions so far,
    which is what incremental decoding needs. A `BeamLayerCache` returns its keys per sentence, shared by
    the sentence's beams, whose queries are then folded (`attend_rows`) under the cache's ancestry mask.
    """

    def __init__(self, d_model: int, n_heads: int, *, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv_proj = Linear(d_model, 3 * d_model)
        self.qkv_proj.blocks = 3
        self.out_proj = Linear(d_model, d_model)

    def forward(
        self,
        x_BTD: Tensor,
        *,
        mask: Tensor | None,
        is_causal: bool = False,
        cache=None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        q_BTD, k_BTD, v_BTD = self.qkv_proj(x_BTD).chunk(3, dim=-1)
        q_BHTK = split_heads(q_BTD, self.n_heads)
        k_BHSK = split_heads(k_BTD, self.n_heads)
        v_BHSK = split_heads(v_BTD, self.n_heads)
        # the keys and values of every position so far: with a beam cache, one row per sentence (M), which
        # the B = n x M query rows of its beams share
        k_MHSK, v_MHSK = (k_BHSK, v_BHSK) if cache is None else cache.append(k_BHSK, v_BHSK)
        output_BTD, weights = attend_rows(
            q_BHTK,
            k_MHSK,
            v_MHSK,
            mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            is_causal=is_causal,
        )
        return self.out_proj(output_BTD), weights


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder memory (separate Q and fused K/V projections).

    `project_memory` computes the memory's keys and values; a decoder computes them once per source
    sentence and reuses them at every step. The queries may have n times as many rows as the memory
    (n adjacent rows, the beams of one sentence, share one memory row): they are then folded into one
    attention call per memory row of n x T queries, so the memory is stored and read once per
    sentence instead of once per beam. Each query's result is the same either way.
    """

    def __init__(self, d_model: int, n_heads: int, *, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model)
        self.kv_proj = Linear(d_model, 2 * d_model)
        self.kv_proj.blocks = 2
        self.out_proj = Linear(d_model, d_model)

    def project_memory(self, memory_BSD: Tensor) -> tuple[Tensor, Tensor]:
        k_BSD, v_BSD = self.kv_proj(memory_BSD).chunk(2, dim=-1)
        # contiguous once per source, so every step's attention reads them without a copy
        return split_heads(k_BSD, self.n_heads).contiguous(), split_heads(v_BSD, self.n_heads).contiguous()

    def forward(
        self,
        x_RTD: Tensor,
        *,
        memory_kv: tuple[Tensor, Tensor],
        mask: Tensor | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x_RTD: R = M x n rows for M memory rows; `mask` is per memory row (M, 1, 1, S) or None."""
        q_RHTK = split_heads(self.q_proj(x_RTD), self.n_heads)
        k_MHSK, v_MHSK = memory_kv
        output_RTD, weights_RHTS = attend_rows(
            q_RHTK,
            k_MHSK,
            v_MHSK,
            mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        return self.out_proj(output_RTD), weights_RHTS
