"""The paper's optimizer: Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9 (section 5.3).

AdamW is used so that a non-zero weight decay is decoupled from the gradient; at the default decay of
0 its update is exactly Adam's. Decay, when asked for, applies to matrices only (never to biases,
LayerNorm gains or the logits bias). The fused kernel (one pass over all parameters) is used on CUDA
and on the CPU, where it is several times faster than the per-tensor loop (4 ms vs 15 ms per step for
`small` on 2 cores).
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig, *, device: torch.device) -> torch.optim.AdamW:
    parameters = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=0.0,  # set before every step by the schedule
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=device.type in ("cuda", "cpu"),
    )
