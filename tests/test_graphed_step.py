"""The graphed training step (one CUDA graph per step on a GPU) makes the updates `train_step` makes.
On the CPU it runs the same function eagerly; the CUDA test records and replays the graph."""

from __future__ import annotations

import copy

import pytest
import torch

from tformer.config import TrainConfig, preset
from tformer.data.batching import Batch
from tformer.model import Transformer
from tformer.training.graphed_step import WARMUP_STEPS, GraphedTrainStep
from tformer.training.optimizer import build_optimizer
from tformer.training.step import train_step

PAD, BOS, EOS = 0, 1, 2


def _batch(seed: int, shape: tuple[int, int, int] = (4, 6, 5)) -> Batch:
    B, S, T = shape
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 40, (B, S), generator=generator)
    tgt = torch.randint(3, 40, (B, T + 1), generator=generator)
    src[0, -2:] = PAD  # one padded source and target
    tgt[0, -2:] = PAD
    n_tgt = int((tgt[:, 1:] != PAD).sum())
    return Batch(
        src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous(), torch.arange(B), int((src != PAD).sum()), n_tgt
    )


def _compare(device: torch.device, dtype: torch.dtype, autocast: torch.dtype | None, tolerance: float) -> None:
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    eager = Transformer(config, seed=5).to(device=device, dtype=dtype).train()
    graphed = copy.deepcopy(eager)
    train = TrainConfig(weight_decay=0.01)
    eager_optimizer = build_optimizer(eager, train, device=device)
    step = GraphedTrainStep(
        graphed, build_optimizer(graphed, train, device=device), batch_shape=(4, 6, 5), smoothing=0.1,
        pad_id=PAD, clip_norm=0.5, device=device, autocast_dtype=autocast,
    )  # fmt: skip
    for index in range(WARMUP_STEPS + 3):  # eager warm-up steps, the recorded step, two replays
        batch = _batch(index)
        lr = 1e-3 * (index + 1)  # the learning rate changes every step
        expected = train_step(
            eager, eager_optimizer, [batch.to(device)], lr=lr, smoothing=0.1, pad_id=PAD, clip_norm=0.5,
            device=device, autocast_dtype=autocast,
        )  # fmt: skip
        got = step(batch.to(device), lr=lr)
        torch.testing.assert_close(got.loss_sum, expected.loss_sum, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(got.grad_norm, expected.grad_norm, rtol=tolerance, atol=tolerance)
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def test_the_graphed_step_updates_like_train_step_on_the_cpu():
    _compare(torch.device("cpu"), torch.float64, None, 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_the_recorded_graph_updates_like_train_step_on_the_gpu():
    _compare(torch.device("cuda"), torch.float32, None, 1e-4)
    _compare(torch.device("cuda"), torch.float32, torch.bfloat16, 2e-2)


def test_a_batch_of_another_shape_is_refused():
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40)
    model = Transformer(config).train()
    cpu = torch.device("cpu")
    step = GraphedTrainStep(
        model, build_optimizer(model, TrainConfig(), device=cpu), batch_shape=(4, 6, 5), smoothing=0.1,
        pad_id=PAD, clip_norm=0.0, device=cpu, autocast_dtype=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="takes batches of source"):
        step(_batch(0, shape=(4, 7, 5)), lr=1e-3)
