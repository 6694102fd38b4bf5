"""torch.compile per layer or of the whole objective: the model keeps its state-dict keys, and compiled steps
train like eager ones."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from tformer.config import TrainConfig, preset
from tformer.data.batching import collate
from tformer.model import Transformer
from tformer.runtime import compile_layers, compile_objective
from tformer.training.optimizer import build_optimizer
from tformer.training.step import TrainingObjective, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiling_layers_keeps_state_dict_keys_and_tensors() -> None:
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30), seed=0)
    before = model.state_dict()
    compile_layers(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[key] is before[key] or torch.equal(after[key], before[key]) for key in before)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler"
)
def test_compiled_steps_give_the_eager_losses() -> None:
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30)
    eager = Transformer(config, seed=1)
    compiled = compile_layers(copy.deepcopy(eager))
    generator = torch.Generator().manual_seed(0)
    special = dict(pad_id=0, bos_id=1, eos_id=2)
    batches = []
    for _ in range(3):  # same shapes: one compilation
        pairs = [(torch.randint(4, 30, (6,), generator=generator).tolist(),) * 2 for _ in range(4)]
        batches.append(collate(pairs, list(range(4)), **special))
    cpu = torch.device("cpu")
    options = dict(lr=1e-3, smoothing=0.1, pad_id=0, clip_norm=1.0, device=cpu)
    train = TrainConfig()
    eager_opt, compiled_opt = build_optimizer(eager, train, device=cpu), build_optimizer(compiled, train, device=cpu)
    # Losses after the first depend on the updates, so they check the backward pass too. (Weights are
    # not compared one by one: Adam turns rounding noise in a gradient that is exactly zero in exact
    # arithmetic, such as the key bias's, into a full +-lr step.)
    for batch in batches:
        expected = train_step(eager, eager_opt, [batch], **options).loss_sum
        got = train_step(compiled, compiled_opt, [batch], **options).loss_sum
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler"
)
def test_a_compiled_objective_trains_like_the_eager_one() -> None:
    """`compile_objective` (the whole model and loss as one graph; CUDA graphs on a GPU) in train_step."""
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30)
    eager, compiled = Transformer(config, seed=2), Transformer(config, seed=2)
    keys = list(compiled.state_dict())
    cpu = torch.device("cpu")
    objective = compile_objective(TrainingObjective(compiled), cpu)
    generator = torch.Generator().manual_seed(1)
    special = dict(pad_id=0, bos_id=1, eos_id=2)
    options = dict(lr=1e-3, smoothing=0.1, pad_id=0, clip_norm=1.0, device=cpu)
    train = TrainConfig()
    eager_opt, compiled_opt = build_optimizer(eager, train, device=cpu), build_optimizer(compiled, train, device=cpu)
    for _ in range(3):
        pairs = [(torch.randint(4, 30, (5,), generator=generator).tolist(),) * 2 for _ in range(3)]
        batch = collate(pairs, list(range(3)), **special)
        expected = train_step(eager, eager_opt, [batch], **options).loss_sum
        got = train_step(compiled, compiled_opt, [batch], **options, objective=objective).loss_sum
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert list(compiled.state_dict()) == keys  # the model itself is not wrapped


def test_an_objective_recorded_into_a_graph_of_its_callers_is_compiled_without_cuda_graphs(monkeypatch) -> None:
    """On a GPU `compile_objective` records CUDA graphs of its own (mode reduce-overhead), unless the caller
    records it into its own graph (training.graphed_step): a graph cannot be recorded inside another. The
    GPU tests see it; this pins the mode on a machine without one."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, *, mode=None: modes.append(mode) or module)
    objective = TrainingObjective(Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30), seed=0))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_objective(objective, cuda) is objective
    compile_objective(objective, cuda, inside_cuda_graph=True)
    compile_objective(objective, cpu)
    assert modes == ["reduce-overhead", None, None]
