"""The graphed training step (one CUDA graph per step on a GPU) makes the updates `train_step` makes.
On the CPU it runs the same function eagerly; the CUDA test records and replays the graph."""

from __future__ import annotations

import copy
import io
import json
import shutil
import threading

import pytest
import torch

from tformer.config import TrainConfig, preset
from tformer.data.batching import Batch
from tformer.model import Transformer
from tformer.runtime import compile_objective
from tformer.training.graphed_step import WARMUP_STEPS, GraphedSteps, GraphedTrainStep, make_capturable
from tformer.training.optimizer import build_optimizer
from tformer.training.step import TrainingObjective, train_step

PAD, BOS, EOS = 0, 1, 2
needs_a_c_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler"
)


@pytest.fixture
def no_tf32():
    """Plain fp32 matmuls, whatever an earlier test set. Not monkeypatch.setattr: torch's cuBLAS flags live behind
    __getattr__ / __setattr__, and pytest >= 9.2 undoes such an attribute with delattr, which torch refuses."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = before


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


def _resumed_optimizer(model: Transformer, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """A fresh optimizer that loaded a graphed run's optimizer state as a resumed run does (via the CPU):
    its learning rate is then a CPU tensor."""
    saved = make_capturable(build_optimizer(model, train, device=device), device).state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    optimizer = build_optimizer(model, train, device=device)
    optimizer.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    return optimizer


def _compare(
    device: torch.device,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    tolerance: float,
    *,
    resumed: bool = False,
    compiled: bool = False,
) -> None:
    """`compiled`: the graphed step records the objective compiled whole (runtime.compile_objective)."""
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    eager = Transformer(config, seed=5).to(device=device, dtype=dtype).train()
    graphed = copy.deepcopy(eager)
    train = TrainConfig(weight_decay=0.01)
    eager_optimizer = build_optimizer(eager, train, device=device)
    make_optimizer = _resumed_optimizer if resumed else build_optimizer
    objective = compile_objective(TrainingObjective(graphed), device, inside_cuda_graph=True) if compiled else None
    step = GraphedTrainStep(
        graphed, make_optimizer(graphed, train, device=device), batch_shape=(4, 6, 5), smoothing=0.1,
        special_ids=(PAD, BOS, EOS), clip_norm=0.5, device=device, autocast_dtype=autocast, objective=objective,
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
        if compiled:  # other kernels, other rounding: the key biases' zero gradients differ in their noise
            a, b = _without_key_biases(name, a, b)
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def _without_key_biases(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two runs' values of parameter `name`, the key bias left out of an attention projection's bias. A key
    bias gets a gradient that is 0 in exact arithmetic (softmax does not see it): Adam turns its rounding
    noise, which differs from kernel to kernel, into steps of +-lr."""
    if name.endswith("qkv_proj.bias"):
        return a.view(3, -1)[0::2], b.view(3, -1)[0::2]  # query and value biases
    if name.endswith("kv_proj.bias"):
        return a.view(2, -1)[1], b.view(2, -1)[1]  # value bias
    return a, b


def test_the_graphed_step_updates_like_train_step_on_the_cpu():
    _compare(torch.device("cpu"), torch.float64, None, 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_the_recorded_graph_updates_like_train_step_on_the_gpu():
    _compare(torch.device("cuda"), torch.float32, None, 1e-4)
    _compare(torch.device("cuda"), torch.float32, torch.bfloat16, 2e-2)


@needs_a_c_compiler
def test_a_graphed_step_with_the_objective_compiled_whole_updates_like_train_step_on_the_cpu():
    _compare(torch.device("cpu"), torch.float64, None, 1e-9, compiled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_the_recorded_graph_of_a_compiled_objective_updates_like_train_step_on_the_gpu(no_tf32):
    """torch.compile's kernels (no CUDA graphs of its own) recorded into the step's graph with the optimizer."""
    _compare(torch.device("cuda"), torch.float32, None, 1e-4, compiled=True)
    _compare(torch.device("cuda"), torch.float32, torch.bfloat16, 2e-2, compiled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_a_step_is_recorded_while_another_thread_pins_memory_on_the_gpu():
    """The Trainer's prefetch thread pins batches while steps are recorded (torch.cuda.graph empties the
    host cache first, so pinning then allocates): in global capture mode that breaks the capture."""
    stop, errors = threading.Event(), []

    def pin() -> None:
        size = 1
        try:
            while not stop.is_set():
                torch.empty(size, dtype=torch.uint8).pin_memory()
                size = 1 if size >= 2**22 else size * 2
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    try:
        _compare(torch.device("cuda"), torch.float32, None, 1e-4)
    finally:
        stop.set()
        thread.join()
    assert not errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_the_recorded_graph_updates_like_train_step_on_a_second_gpu():
    """cuda:1 while cuda:0 is current: the graph must be recorded on cuda:1 (tests/test_cuda_capture.py)."""
    _compare(torch.device("cuda", 1), torch.float32, None, 1e-4)


def test_a_loaded_learning_rate_tensor_is_moved_to_the_device():
    """A graphed run's checkpoint stores the learning rate as a tensor, loaded on the CPU; left there, the
    fused kernel on a GPU reads it once, when the step is recorded, and the replays keep that learning
    rate whatever the schedule says (the GPU test below). The meta device stands in for the GPU."""
    model = Transformer(preset("tiny", src_vocab_size=40, tgt_vocab_size=40))
    optimizer = _resumed_optimizer(model, TrainConfig(), torch.device("cpu"))
    make_capturable(optimizer, torch.device("meta"))
    assert {group["lr"].device.type for group in optimizer.param_groups} == {"meta"}


def test_a_resumed_graphed_step_follows_the_learning_rate_on_the_cpu():
    _compare(torch.device("cpu"), torch.float64, None, 1e-9, resumed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_a_resumed_graphed_step_follows_the_learning_rate_on_the_gpu():
    _compare(torch.device("cuda"), torch.float32, None, 1e-4, resumed=True)


def test_a_batch_of_another_shape_is_refused():
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40)
    model = Transformer(config).train()
    cpu = torch.device("cpu")
    step = GraphedTrainStep(
        model, build_optimizer(model, TrainConfig(), device=cpu), batch_shape=(4, 6, 5), smoothing=0.1,
        special_ids=(PAD, BOS, EOS), clip_norm=0.0, device=cpu, autocast_dtype=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="takes batches of at most source"):
        step(_batch(0, shape=(4, 7, 5)), lr=1e-3)


FLOAT32_ADAM_EPS = 1e-3  # see _compare_shapes


def _compare_shapes(device: torch.device, dtype: torch.dtype, tolerance: float, *, adam_eps: float) -> None:
    """GraphedSteps pads batches of many shapes into a few rounded ones (one graph each on a GPU); the
    updates are train_step's on the unpadded batches, every parameter to `tolerance`.

    Padding changes only the order of sums, so gradients differ by rounding. AdamW divides each gradient by
    its running RMS plus eps: with the paper's eps = 1e-9 a gradient that is zero in exact arithmetic (a key
    bias: softmax cancels it) or merely tiny (a rarely active ReLU unit's weights) is rounding noise of a
    size that depends on the summation order, and Adam scales it into whole +-lr steps. In float32 the
    comparison therefore runs with eps = 1e-3: such noise then moves a weight by lr/eps times its size,
    far below the tolerance, while large gradients are normalised as before."""
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.0)
    train = TrainConfig(adam_eps=adam_eps)
    eager = Transformer(config, seed=7).to(device=device, dtype=dtype).train()
    graphed = copy.deepcopy(eager)
    eager_optimizer = build_optimizer(eager, train, device=device)
    steps = GraphedSteps(
        graphed, build_optimizer(graphed, train, device=device), smoothing=0.1,
        special_ids=(PAD, BOS, EOS), clip_norm=1.0, device=device, autocast_dtype=None,
    )  # fmt: skip
    shapes = [(4, 6, 5), (3, 9, 7), (4, 6, 5), (5, 3, 8), (2, 6, 5)] * 2  # (2, 6, 5) pads rows too
    for index, shape in enumerate(shapes):
        batch = _batch(100 + index, shape=shape)
        options = dict(lr=2e-3, smoothing=0.1, pad_id=PAD, clip_norm=1.0, device=device)
        expected = train_step(eager, eager_optimizer, [batch.to(device)], **options)
        got = steps(batch, lr=2e-3)
        torch.testing.assert_close(got.loss_sum, expected.loss_sum, rtol=tolerance, atol=tolerance)
    assert sorted(steps.steps) == [(32, 8, 8), (32, 16, 8)]
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def test_batches_of_any_shape_are_padded_into_a_few_graphed_shapes():
    _compare_shapes(torch.device("cpu"), torch.float64, 1e-9, adam_eps=TrainConfig().adam_eps)


def test_padded_shapes_in_float32_give_the_eager_updates_with_a_larger_adam_eps():
    _compare_shapes(torch.device("cpu"), torch.float32, 1e-5, adam_eps=FLOAT32_ADAM_EPS)


def test_padded_shapes_in_float32_with_the_papers_adam_eps_move_near_zero_gradients_by_whole_steps():
    """Why the float32 comparisons use a larger eps: with eps = 1e-9 the padded and unpadded runs end with
    parameters apart by about lr (near-zero gradients' rounding noise, scaled up by Adam), so the comparison
    above would fail for reasons that have nothing to do with the graphed step."""
    with pytest.raises(AssertionError):
        _compare_shapes(torch.device("cpu"), torch.float32, 1e-5, adam_eps=TrainConfig().adam_eps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")
def test_batches_of_any_shape_are_padded_into_a_few_graphed_shapes_on_the_gpu(no_tf32):
    _compare_shapes(torch.device("cuda"), torch.float32, 1e-5, adam_eps=FLOAT32_ADAM_EPS)


def test_the_trainer_with_cuda_graphs_trains_like_the_eager_trainer(tmp_path):
    """train.cuda_graphs: the Trainer's steps go through GraphedSteps (eager on the CPU, padded to rounded
    shapes); without dropout the run ends with the weights and losses of the eager run."""
    from training_helpers import tiny_experiment, write_corpus

    from tformer.training import load_run, resume_run, start_run

    corpus = write_corpus(tmp_path)
    runs = {}
    for graphs in (False, True):
        experiment = tiny_experiment(corpus, "model.dropout=0.0", f"train.cuda_graphs={str(graphs).lower()}")
        trainer = start_run(experiment, tmp_path / f"run-{graphs}", quiet=True)
        trainer.train()
        assert (trainer.graphed_steps is not None) == graphs
        runs[graphs] = tmp_path / f"run-{graphs}"
    eager, graphed = load_run(runs[False], which="last"), load_run(runs[True], which="last")
    for (name, a), b in zip(graphed.model.state_dict().items(), eager.model.state_dict().values(), strict=True):
        a, b = _without_key_biases(name, a, b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    losses = [
        [json.loads(line).get("train_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (runs[False], runs[True])
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # a graphed run resumes (the loaded AdamW state is made capturable again), with or without graphs
    assert resume_run(runs[True], overrides=["train.max_steps=10"], quiet=True).train().step == 10
    off = ["train.max_steps=12", "train.cuda_graphs=false"]
    assert resume_run(runs[True], overrides=off, quiet=True).train().step == 12


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_a_run_with_cuda_graphs_trains_and_resumes_like_an_eager_run(tmp_path, monkeypatch, no_tf32, device):
    """The Trainer with train.cuda_graphs, on a GPU: batches prefetched and pinned by a background thread
    while steps are recorded, one graph per rounded shape, then a resumed run (the optimizer state loaded
    from the checkpoint, the learning rate still scheduled). In fp32 without TF32, the losses are the
    eager run's to rounding (padding changes only the order of sums)."""
    from tformer.training import resume_run

    losses = {}
    for graphs in (False, True):
        run = _fp32_run(tmp_path, monkeypatch, device, graphs=graphs).run_dir
        assert resume_run(run, overrides=["train.max_steps=14"], quiet=True).train().step == 14
        losses[graphs] = _train_losses(run)
    assert len(losses[True]) == 14
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def _fp32_run(tmp_path, monkeypatch, device: str, *, graphs: bool, compile_mode: str = "none"):
    """The Trainer of a tiny 6-step run in plain fp32 (no TF32, no dropout) on `device`, trained, in
    tmp_path/run-{graphs}, with or without train.cuda_graphs."""
    from training_helpers import tiny_experiment, write_corpus

    from tformer.training import loop, start_run

    monkeypatch.setattr(loop, "configure_backends", lambda device: None)  # no TF32: both runs in plain fp32
    corpus = write_corpus(tmp_path)
    settings = [f"train.device={device}", "train.precision=fp32", "model.dropout=0.0", "train.max_steps=6"]
    experiment = tiny_experiment(corpus, *settings, f"train.cuda_graphs={str(graphs).lower()}")
    trainer = start_run(experiment, tmp_path / f"run-{graphs}", quiet=True, compile_mode=compile_mode)
    trainer.train()
    return trainer


def _train_losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=needs_a_c_compiler),
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_a_run_with_cuda_graphs_and_the_objective_compiled_whole_trains_like_an_eager_run(
    tmp_path, monkeypatch, no_tf32, device
):
    """train.cuda_graphs with --compile model: each rounded shape's graph records the compiled objective
    (compiled again where a dimension first changes); in fp32 the losses are the eager run's to rounding."""
    losses = {}
    for graphs in (False, True):
        trainer = _fp32_run(tmp_path, monkeypatch, device, graphs=graphs, compile_mode="model" if graphs else "none")
        if graphs:
            assert len(trainer.graphed_steps.steps) >= 2  # batches of more than one rounded shape
            assert all(step.objective is trainer.objective for step in trainer.graphed_steps.steps.values())
            assert hasattr(trainer.objective, "_orig_mod")  # compiled
        losses[graphs] = _train_losses(trainer.run_dir)
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_trainer_compiles_the_objective_for_its_graphed_steps_without_graphs_of_its_own(
    tmp_path, monkeypatch, graphs
):
    """--compile model alone compiles with CUDA graphs on a GPU; with train.cuda_graphs the graphed steps
    record the compiled objective, which must then record none of its own (seen here on the CPU)."""
    from training_helpers import tiny_experiment, write_corpus

    from tformer.training import loop, start_run

    calls = []
    monkeypatch.setattr(
        loop, "compile_objective", lambda objective, device, **options: calls.append(options) or objective
    )
    experiment = tiny_experiment(write_corpus(tmp_path), f"train.cuda_graphs={str(graphs).lower()}")
    start_run(experiment, tmp_path / "run", quiet=True, compile_mode="model").lock.release()
    assert calls == [{"inside_cuda_graph": graphs}]


def test_cuda_graphs_refuse_what_they_cannot_record(tmp_path):
    from training_helpers import tiny_experiment, write_corpus

    from tformer.config import ConfigError
    from tformer.training import start_run

    corpus = write_corpus(tmp_path)
    with pytest.raises(ConfigError, match=r"set train\.accumulate = 1"):
        tiny_experiment(corpus, "train.cuda_graphs=true", "train.accumulate=2")
    experiment = tiny_experiment(corpus, "train.cuda_graphs=true")
    with pytest.raises(ConfigError, match="without --loss-chunk"):
        start_run(experiment, tmp_path / "run", quiet=True, loss_chunk=4)


@pytest.mark.parametrize(
    ("device", "compiled"),
    [
        ("cpu", False),
        pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
        pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_dropout_draws_new_masks_at_every_replay_on_the_gpu(device, compiled):
    """A recorded step replays its kernels with the random generator's offset advanced, so each replay
    draws new dropout masks (attention dropout in the fused kernel included; `compiled`: torch.compile's
    own dropout kernels, the objective compiled whole). At learning rate 0 the weights stay as they are, so
    the same batch gives another loss at every step only through dropout."""
    device = torch.device(device)
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, dropout=0.3, attention_dropout=0.3)
    model = Transformer(config, seed=2).to(device).train()
    objective = compile_objective(TrainingObjective(model), device, inside_cuda_graph=True) if compiled else None
    step = GraphedTrainStep(
        model, build_optimizer(model, TrainConfig(), device=device), batch_shape=(4, 6, 5), smoothing=0.1,
        special_ids=(PAD, BOS, EOS), clip_norm=0.0, device=device, autocast_dtype=None, objective=objective,
    )  # fmt: skip
    batch = _batch(0).to(device)
    losses = [float(step(batch, lr=0.0).loss_sum) for _ in range(WARMUP_STEPS + 3)]  # warm-up, record, 2 replays
    assert len(set(losses[WARMUP_STEPS:])) == 3, losses
