"""Label-smoothed cross-entropy over the target tokens, padding ignored (paper section 5.4).

Label smoothing (the paper's eps_ls = 0.1, `train.label_smoothing`) trains each position t against a
softened target distribution q_t instead of the one-hot reference y_t. Over a vocabulary of V tokens,

    q_t(v) = (1 - eps) * [v == y_t] + eps / V

that is, 1 - eps + eps / V on the reference token and eps / V on every other one (pad included, as
in torch). The cross-entropy against q_t splits into the usual negative log-likelihood and the
cross-entropy against the uniform distribution, which is how it is computed below:

    loss_t = -sum_v q_t(v) * log p(v) = (1 - eps) * -log p(y_t) + eps * mean_v -log p(v)

This is what `torch.nn.functional.cross_entropy(label_smoothing=eps)` computes (tests compare them).
The plain NLL, -log p(y_t), is returned beside it: the paper notes that smoothing "hurts perplexity",
so perplexity is reported from the NLL, not from the smoothed loss.

Padding: a position whose target is `pad_id` contributes nothing (neither term) and is not counted.
The loss comes back as a *sum* with its token count, never a mean: the caller divides by the target
tokens of the whole update (training/step.py), so that the loss is per target token, and gradient
accumulation over micro-batches and averaging across processes divide once by the true total and stay
exact (a mean of per-batch means would give each token of a batch with few tokens more weight).

`chunked_label_smoothed_loss` computes the same sums from the final hidden states, projecting to the
vocabulary `chunk` positions at a time. Each chunk runs under activation checkpointing: its logits are
freed as soon as its loss is summed and recomputed during backward, so at most one chunk's C x V
logits (and their gradient) exist at any moment instead of the whole batch's N x V.

Shape legend: B batch, T target length, D model dim, V vocabulary, N = B * T positions, C positions of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LossSums:
    """Scalars on the logits' device: smoothed loss, plain negative log-likelihood, real tokens."""

    loss_sum: Tensor
    nll_sum: Tensor
    n_tokens: Tensor


def label_smoothed_loss(logits_BTV: Tensor, target_BT: Tensor, *, smoothing: float, pad_id: int) -> LossSums:
    """Summed smoothed loss and NLL over the positions whose target is not `pad_id`, in float32 or wider:
    logits that autocast made bf16 are upcast first, since bf16 keeps only 8 significant bits (2 to 3
    decimal digits), too few for a log-softmax over V or a sum over thousands of tokens."""
    check_loss_arguments(logits_BTV, "logits_BTV", target_BT, smoothing)
    dtype = torch.promote_types(logits_BTV.dtype, torch.float32)
    log_probs_NV = F.log_softmax(logits_BTV.flatten(0, 1).to(dtype), dim=-1)
    target_N = target_BT.flatten()
    keep_N = target_N != pad_id
    # -log p(y_t); the clamp only keeps gather's index valid for a negative pad_id, whose rows where() drops
    nll_N = -log_probs_NV.gather(1, target_N.clamp(min=0)[:, None]).squeeze(1)
    uniform_N = -log_probs_NV.mean(dim=-1)  # cross-entropy against the uniform distribution 1 / V
    loss_N = (1.0 - smoothing) * nll_N + smoothing * uniform_N
    zero = log_probs_NV.new_zeros(())
    # where(), not multiplication by the mask: a non-finite value at a padded position must not leak.
    return LossSums(
        loss_sum=torch.where(keep_N, loss_N, zero).sum(),
        nll_sum=torch.where(keep_N, nll_N, zero).sum(),
        n_tokens=keep_N.sum(),
    )


def check_loss_arguments(scores_BT_: Tensor, name: str, target_BT: Tensor, smoothing: float) -> None:
    """What the loss cannot use, refused naming it (it failed deep inside torch's gather, or was computed
    anyway): targets that are not (batch, length) token ids for the scores' first two dims, a smoothing
    outside [0, 1)."""
    if scores_BT_.shape[:2] != target_BT.shape or target_BT.is_floating_point():
        raise ValueError(
            f"target_BT must be (batch, length) token ids for {name} of shape {tuple(scores_BT_.shape)}; "
            f"got {target_BT.dtype} of shape {tuple(target_BT.shape)}"
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")


def chunked_label_smoothed_loss(
    hidden_BTD: Tensor,
    project: Callable[[Tensor], Tensor],
    target_BT: Tensor,
    *,
    smoothing: float,
    pad_id: int,
    chunk: int,
) -> LossSums:
    """`label_smoothed_loss(project(hidden_BTD), target_BT)` without ever holding all the logits."""
    check_loss_arguments(hidden_BTD, "hidden_BTD", target_BT, smoothing)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 target position, got {chunk}")
    hidden_ND, target_N = hidden_BTD.flatten(0, 1), target_BT.flatten()
    loss_sum = nll_sum = None
    for hidden_CD, target_C in zip(hidden_ND.split(chunk), target_N.split(chunk), strict=True):
        loss_C, nll_C = checkpoint(_chunk_sums, hidden_CD, target_C, project, smoothing, pad_id, use_reentrant=False)
        loss_sum = loss_C if loss_sum is None else loss_sum + loss_C
        nll_sum = nll_C if nll_sum is None else nll_sum + nll_C
    assert loss_sum is not None and nll_sum is not None
    return LossSums(loss_sum=loss_sum, nll_sum=nll_sum, n_tokens=(target_N != pad_id).sum())


def _chunk_sums(
    hidden_CD: Tensor, target_C: Tensor, project: Callable[[Tensor], Tensor], smoothing: float, pad_id: int
) -> tuple[Tensor, Tensor]:
    sums = label_smoothed_loss(project(hidden_CD)[None], target_C[None], smoothing=smoothing, pad_id=pad_id)
    return sums.loss_sum, sums.nll_sum
