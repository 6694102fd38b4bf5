"""The optimizer step and the Trainer loop: accumulation, divergence, stopping, pruning, metrics."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_experiment, write_corpus

from tformer.config import TrainConfig, preset
from tformer.data.batching import collate
from tformer.model import Transformer
from tformer.training import Trainer, TrainingDivergedError, load_run, resume_run, start_run
from tformer.training import checkpoint as ckpt
from tformer.training.optimizer import build_optimizer
from tformer.training.step import needs_pinning, train_step
from tformer.training.validation import EarlyStopping

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n, 2), generator=generator).tolist()
    return [
        (
            torch.randint(4, 30, (s,), generator=generator).tolist(),
            torch.randint(4, 30, (t,), generator=generator).tolist(),
        )
        for s, t in lengths
    ]


def test_only_pageable_host_batches_bound_for_a_gpu_are_pinned() -> None:
    host = collate(_pairs(3, seed=1), [0, 1, 2], pad_id=0, bos_id=1, eos_id=2)
    assert needs_pinning(host, torch.device("cuda"))
    assert not needs_pinning(host, torch.device("cpu"))
    # A batch the caller already moved to a device (benchmarks/train.py does) must not be pinned:
    # pinning a device tensor raises. The meta device stands in for the GPU on a CPU-only machine.
    on_device = host.to(torch.device("meta"))
    assert not needs_pinning(on_device, torch.device("cuda"))


@pytest.mark.parametrize("clip_norm", [0.0, 0.5])
def test_k_micro_batches_equal_one_batch_k_times_larger(clip_norm: float) -> None:
    model_config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30, dropout=0.0)
    split = Transformer(model_config, seed=3).double()
    whole = copy.deepcopy(split)
    train = TrainConfig()
    pairs = _pairs(9, seed=0)
    special = dict(pad_id=0, bos_id=1, eos_id=2)
    micro = [collate(pairs, list(range(i, i + 3)), **special) for i in (0, 3, 6)]
    big = collate(pairs, list(range(9)), **special)
    cpu = torch.device("cpu")
    options = dict(lr=1e-3, smoothing=0.1, pad_id=0, clip_norm=clip_norm, device=cpu)
    result_split = train_step(split, build_optimizer(split, train, device=cpu), micro, **options)
    result_whole = train_step(whole, build_optimizer(whole, train, device=cpu), [big], **options)
    assert result_split.n_tgt_tokens == result_whole.n_tgt_tokens == big.n_tgt_tokens
    torch.testing.assert_close(result_split.loss_sum, result_whole.loss_sum, rtol=1e-6, atol=1e-6)
    # The update itself is not compared: Adam's first step moves each weight by about +-lr whatever the
    # gradient's size, so rounding noise in a gradient that is zero in exact arithmetic (the key bias)
    # would flip signs. The gradients are what accumulation must get right.
    for (name, a), b in zip(split.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)
    if clip_norm:
        torch.testing.assert_close(result_split.grad_norm, result_whole.grad_norm)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    experiment = tiny_experiment(corpus, "train.max_steps=20", "train.log_every=5", "train.save_every=4", valid=False)
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    calls = {"n": 0}

    def poison(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 7 else output

    trainer.model.register_forward_hook(poison)
    with pytest.raises(
        TrainingDivergedError, match=r"non-finite at step 7; the last good checkpoint is .*step-00000004"
    ):
        trainer.train()
    assert ckpt.read_pointer_name(tmp_path / "run", "latest") == "step-00000004"
    assert [path.name for path in ckpt.step_checkpoints(tmp_path / "run")] == ["step-00000004"]
    loaded = load_run(tmp_path / "run", which="last")
    assert loaded.step == 4 and all(torch.isfinite(p).all() for p in loaded.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5]  # the row of step 10 was never written


def _poisoned_from(trainer: Trainer, first_call: int) -> None:
    """Make the model's output NaN from its `first_call`-th forward pass on (one per step without validation)."""
    calls = {"n": 0}

    def poison(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= first_call else output

    trainer.model.register_forward_hook(poison)


@pytest.mark.parametrize("keep_last", [0, 1])
def test_a_checkpoint_of_the_step_before_the_non_finite_loss_is_not_named_good(tmp_path: Path, keep_last: int) -> None:
    """The loss of step n is computed from the weights after step n - 1: their checkpoint, saved at the end
    of step n - 1, was named "the last good checkpoint", and resumed as advised it diverged again at step n
    whatever the learning rate. The error names the one before it, and how to go back to it."""
    corpus = write_corpus(tmp_path)
    settings = ("train.max_steps=20", "train.log_every=5", "train.save_every=1", f"train.keep_last={keep_last}")
    trainer = start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "run", quiet=True)
    _poisoned_from(trainer, 7)
    with pytest.raises(TrainingDivergedError) as raised:
        trainer.train()
    message, run = str(raised.value), tmp_path / "run"
    assert re.search(r"at step 7; the last checkpoint, .*step-00000006, holds the weights that gave", message)
    assert ckpt.read_pointer_name(run, "latest") == "step-00000006"
    if keep_last == 1:
        assert "no earlier one is kept: start afresh with --overwrite" in message
        return
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-00000005'}: " in message
    assert f"echo step-00000005 > {run / 'latest'} && tformer train --out {run} --resume" in message
    (run / "latest").write_text("step-00000005\n")  # as the message says, then a resume without the poison
    result = resume_run(run, overrides=["train.max_steps=8"], quiet=True).train()
    assert result.step == 8 and result.stop_reason == "reached max_steps=8"


def test_stopping_by_epochs_and_by_time(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    by_epoch = start_run(
        tiny_experiment(corpus, "train.max_steps=0", "train.max_epochs=1", valid=False), tmp_path / "e", quiet=True
    )
    n_batches = len(by_epoch.data.stream.plan(0))
    result = by_epoch.train()
    assert result.stop_reason == "reached max_epochs=1" and result.step == n_batches
    by_time = start_run(tiny_experiment(corpus, "train.max_time_s=0.001", valid=False), tmp_path / "t", quiet=True)
    result = by_time.train()
    assert result.stop_reason == "reached max_time_s=0.001" and result.step == 1
    assert ckpt.read_pointer_name(tmp_path / "t", "latest") == "step-00000001"


def test_keeps_best_and_last_k_checkpoints_and_logs_metrics(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    experiment = tiny_experiment(
        corpus, "train.max_steps=12", "train.save_every=2", "train.valid_every=2", "train.keep_last=2"
    )
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    result = trainer.train()
    names = [path.name for path in ckpt.step_checkpoints(tmp_path / "run")]
    best = ckpt.read_pointer_name(tmp_path / "run", "best")
    assert names[-2:] == ["step-00000010", "step-00000012"]
    assert set(names) == {best, "step-00000010", "step-00000012"}
    assert best == ckpt.step_name(result.best_step)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert {"step", "epoch", "wall_s", "train_loss", "train_nll", "lr", "tokens_per_s"} <= set(rows[0])
    assert "valid_loss" in rows[1] and "valid_ppl" in rows[1] and "valid_loss" not in rows[0]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert min(row["valid_loss"] for row in rows if "valid_loss" in row) == pytest.approx(result.best_metric)


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    loss = EarlyStopping("loss", patience=2)
    assert loss.update(3.0, 1) and loss.update(2.5, 2)
    assert not loss.update(2.6, 3) and not loss.should_stop
    assert not loss.update(2.5, 4) and loss.should_stop  # equal is not better
    assert (loss.best, loss.best_step) == (2.5, 2)
    bleu = EarlyStopping("bleu", patience=0)
    assert bleu.update(10.0, 1) and not bleu.update(9.0, 2) and bleu.update(11.0, 3)
    assert not bleu.should_stop
    restored = EarlyStopping("loss", patience=2)
    restored.load_state_dict(loss.state_dict())
    assert restored == loss


def test_a_non_finite_validation_loss_is_never_the_best(tmp_path: Path) -> None:
    """The first validation's loss became the best whatever it was: NaN, it named the checkpoint of a
    broken model `best` (what translate, evaluate and serve read), and no later loss could beat it."""
    nan = float("nan")
    loss = EarlyStopping("loss", patience=2)
    assert not loss.update(nan, 1) and not loss.update(float("inf"), 2) and loss.best is None
    assert loss.update(3.0, 3) and (loss.best, loss.best_step) == (3.0, 3)
    corpus = write_corpus(tmp_path)
    trainer = start_run(tiny_experiment(corpus), tmp_path / "run", quiet=True)  # validates at steps 4 and 8

    def poison(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if module.training else output * nan  # the validation loss only

    trainer.model.register_forward_hook(poison)
    result = trainer.train()
    assert result.step == 8 and result.best_metric is None
    assert ckpt.read_pointer_name(tmp_path / "run", "best") is None


def test_a_non_finite_best_saved_by_an_earlier_tformer_is_unset_on_resume() -> None:
    """A checkpoint saved before NaN was refused as the best holds best=NaN: resumed, no later value beat it
    (every comparison with NaN is false), so `best` stayed on the broken model for the rest of the run."""
    loss = EarlyStopping("loss", patience=2)
    saved = {"metric": "loss", "best": float("nan"), "best_step": 4, "bad_evaluations": 1}
    assert loss.load_state_dict(saved) is None and loss.best is None
    assert loss.update(3.0, 8) and (loss.best, loss.best_step, loss.bad_evaluations) == (3.0, 8, 0)


def test_early_stopping_bleu_equal_is_not_better_and_an_improvement_restarts_the_count() -> None:
    """The count is of evaluations in a row without improvement: an improvement sets it back to 0. For BLEU
    (higher is better), as for the loss, a value equal to the best is no improvement."""
    bleu = EarlyStopping("bleu", patience=2)
    assert bleu.update(20.0, 1) and not bleu.update(20.0, 2)  # equal: not better
    assert bleu.bad_evaluations == 1 and (bleu.best, bleu.best_step) == (20.0, 1)
    assert bleu.update(21.0, 3) and bleu.bad_evaluations == 0
    assert not bleu.update(19.0, 4) and not bleu.should_stop  # one bad evaluation since the improvement
    assert not bleu.update(21.0, 5) and bleu.should_stop
    assert (bleu.best, bleu.best_step) == (21.0, 3)


def test_early_stopping_ends_the_run_and_best_points_at_the_best_step(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    experiment = tiny_experiment(
        corpus, "train.max_steps=50", "train.valid_every=2", "train.save_every=100", "train.patience=2"
    )
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    measured = iter([3.0, 2.0, 2.5, 2.0, 9.0])
    trainer.validator.loss = lambda: {"valid_loss": next(measured)}  # the wiring, not the numbers, is tested
    result = trainer.train()
    assert result.step == 8 and result.stop_reason.startswith("early stopping: loss did not improve for 2")
    assert (result.best_metric, result.best_step) == (2.0, 4)
    assert ckpt.read_pointer_name(tmp_path / "run", "best") == "step-00000004"
    assert ckpt.read_pointer_name(tmp_path / "run", "latest") == "step-00000008"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_data_parallel_step_never_waits_for_the_gpu(tmp_path: Path) -> None:
    """The data-parallel step sums the target tokens of every process on the device. Made with
    torch.tensor(value, device=cuda), the count was a blocking copy from the host: at every step the host
    waited for all the kernels it had queued. One process stands for the group (its all-reduce is the
    identity); a Distributed of two processes takes the data-parallel path."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tformer.runtime import Distributed
    from tformer.training.step import TrainingObjective

    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30), seed=3).to(device).train()
        objective = DistributedDataParallel(TrainingObjective(model), device_ids=[device.index])
        optimizer = build_optimizer(model, TrainConfig(), device=device)
        batch = collate(_pairs(4, seed=2), [0, 1, 2, 3], pad_id=0, bos_id=1, eos_id=2).to(device)
        options = dict(lr=1e-3, smoothing=0.1, pad_id=0, clip_norm=1.0, device=device)
        for step in range(13):  # DDP times its first 10 iterations (and builds its buckets): not checked
            torch.cuda.set_sync_debug_mode("error" if step == 12 else "default")
            try:
                train_step(
                    model, optimizer, [batch], **options, objective=objective, distributed=Distributed(world_size=2)
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()
