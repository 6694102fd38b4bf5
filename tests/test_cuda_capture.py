"""How the CUDA graphs of training (training/graphed_step.py) and decoding (decoding/graphed.py) are
recorded, checked on the CPU against a stand-in for torch.cuda's streams and graphs (tests/fake_cuda.py):
the kernels are not recorded, but the GPU, stream and capture mode each capture asks for are."""

from __future__ import annotations

import pytest
import torch
from fake_cuda import FakeStream, fake_cuda  # noqa: F401  (a fixture)

from tformer.config import TrainConfig, preset
from tformer.data.batching import Batch
from tformer.decoding.graphed import GraphedFunction
from tformer.model import Transformer
from tformer.training.graphed_step import WARMUP_STEPS, GraphedTrainStep
from tformer.training.optimizer import build_optimizer

SECOND_GPU = torch.device("cuda", 1)


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(3, 40, (4, 6), generator=generator)
    tgt = torch.randint(3, 40, (4, 6), generator=generator)
    return Batch(src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous(), torch.arange(4), 24, 20)


def test_a_decoding_graph_is_recorded_on_the_gpu_its_tensors_are_on(fake_cuda):  # noqa: F811
    """With tensors on cuda:1 and cuda:0 current, torch's default capture stream is cuda:0's: the kernels
    would run on cuda:1's own stream, outside the capture, and every replay would do nothing."""
    counter = torch.zeros(1)

    def function() -> torch.Tensor:
        counter.add_(1)
        return counter * 2

    graphed = GraphedFunction(function, mutable=[counter], device=SECOND_GPU)
    graphed.replay()
    graphed.replay()
    (graph,) = fake_cuda.graphs
    assert graph.captured_on == SECOND_GPU
    assert graph.replays == 2
    assert fake_cuda.current == 0  # the current GPU is given back


def _step_posing_on(device: torch.device, monkeypatch) -> GraphedTrainStep:
    """A GraphedTrainStep that computes on the CPU but takes its CUDA branch, as on `device`: it is given
    the device and side stream it would have there, and batches stay where they are."""
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    model = Transformer(config, seed=0).train()
    cpu = torch.device("cpu")
    step = GraphedTrainStep(
        model, build_optimizer(model, TrainConfig(), device=cpu), batch_shape=(4, 6, 5), smoothing=0.1,
        special_ids=(0, 1, 2), clip_norm=1.0, device=cpu, autocast_dtype=None,
    )  # fmt: skip
    step.device, step.side_stream = device, FakeStream(device)
    monkeypatch.setattr(Batch, "to", lambda batch, device, non_blocking=False: batch)
    return step


def test_the_training_graph_is_recorded_on_the_gpu_it_trains_on(fake_cuda, monkeypatch):  # noqa: F811
    """GraphedTrainStep on cuda:1 (train.device = cuda:1, one process: cuda:0 stays current) records on
    a stream of cuda:1."""
    step = _step_posing_on(SECOND_GPU, monkeypatch)
    for _ in range(WARMUP_STEPS + 2):  # eager warm-up steps, the recorded step, one more replay
        step(_batch(), lr=1e-3)
    (graph,) = fake_cuda.graphs
    assert graph.captured_on == SECOND_GPU
    assert graph.replays == 2


def test_captures_leave_other_threads_free_to_pin_memory(fake_cuda, monkeypatch):  # noqa: F811
    """The training loop's prefetch thread pins batches while a step (or, at validation, a decoding step)
    is recorded; in torch's default "global" capture mode its page-locked allocations and event queries
    break the capture (and raise in that thread). Both captures are thread-local."""
    GraphedFunction(lambda: torch.zeros(1), mutable=[], device=torch.device("cuda", 0)).replay()
    step = _step_posing_on(torch.device("cuda", 0), monkeypatch)
    for _ in range(WARMUP_STEPS + 1):
        step(_batch(), lr=1e-3)
    assert [graph.capture_error_mode for graph in fake_cuda.graphs] == ["thread_local", "thread_local"]


def test_a_failed_decoding_capture_is_retried_by_the_next_replay(fake_cuda):  # noqa: F811
    """A capture can fail (out of memory, say). The decoding graphs are kept with the model for every later
    batch of their shape (the server's worker decodes on after an error): a graph whose recording failed
    must not be kept, or each of those batches fails on replaying it."""
    graphed = GraphedFunction(lambda: torch.zeros(1), mutable=[], device=torch.device("cuda", 0))
    fake_cuda.fail_captures = 1
    with pytest.raises(RuntimeError, match="stream is capturing"):
        graphed.replay()
    graphed.replay()
    assert [graph.replays for graph in fake_cuda.graphs if graph.captured_on is not None] == [1]
