"""Resuming reproduces the uninterrupted run bit for bit on CPU: losses, validation and weights.

Dropout is on, so the random generators must be restored exactly; accumulation is on, so the data
position must be restored between micro-batches of the same epoch plan.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_helpers import tiny_experiment, write_corpus

from tformer.cli.main import main
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load, checkpoint_save, load_run, loop, resume_run, start_run, trainer_state

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ("model.dropout=0.2", "train.accumulate=2", "train.max_steps=10", "train.save_every=3")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / ckpt.METRICS_FILE).read_text().splitlines()]


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_run(run_a, which="last"), load_run(run_b, which="last")
    assert a.step == b.step
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_s", "tokens_per_s")} for row in rows]


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    experiment = tiny_experiment(corpus, *SETTINGS)
    start_run(experiment, tmp_path / "whole", quiet=True).train()

    interrupted = start_run(experiment, tmp_path / "cut", quiet=True)
    calls = {"n": 0}

    def interrupt_in_step_8(module: torch.nn.Module, inputs: tuple) -> None:
        calls["n"] += module.training
        if calls["n"] > 2 * 7 + 1:  # two micro-batches per step: stop inside step 8
            raise KeyboardInterrupt

    interrupted.model.register_forward_pre_hook(interrupt_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert ckpt.read_pointer_name(tmp_path / "cut", "latest") == "step-00000006"
    assert _rows(tmp_path / "cut")[-1]["step"] == 7  # logged past the checkpoint: dropped on resume

    resumed = resume_run(tmp_path / "cut", quiet=True)
    assert resumed.step == 6
    resumed.train()
    whole, cut = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert [row["step"] for row in cut] == list(range(1, 11))
    assert _without_timing(cut) == _without_timing(whole)  # train and valid losses, exactly
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")


def test_resume_between_logging_steps_writes_the_same_metrics(tmp_path: Path) -> None:
    """The checkpoint keeps the logging window: the first row after a resume averages the steps
    before the checkpoint too, as the uninterrupted run's row does."""
    corpus = write_corpus(tmp_path, n_train=60)
    settings = ("train.log_every=4", "train.save_every=3", "train.valid_every=8", "train.max_steps=8")
    experiment = tiny_experiment(corpus, *settings)
    start_run(experiment, tmp_path / "whole", quiet=True).train()

    interrupted = start_run(experiment, tmp_path / "cut", quiet=True)
    calls = {"n": 0}

    def interrupt_in_step_5(module: torch.nn.Module, inputs: tuple) -> None:
        calls["n"] += module.training
        if calls["n"] > 4:
            raise KeyboardInterrupt

    interrupted.model.register_forward_pre_hook(interrupt_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert ckpt.read_pointer_name(tmp_path / "cut", "latest") == "step-00000003"  # steps 1-3 not yet logged

    resume_run(tmp_path / "cut", quiet=True).train()

    whole, cut = _without_timing(_rows(tmp_path / "whole")), _without_timing(_rows(tmp_path / "cut"))
    assert [row["step"] for row in whole] == [4, 8] and "train_loss" in whole[0] and "valid_loss" in whole[1]
    assert cut == whole


def test_tokens_per_s_after_a_resume_counts_only_the_steps_trained_since(tmp_path: Path, monkeypatch) -> None:
    """The logging window a checkpoint keeps holds the tokens of steps trained before the interruption,
    whose time the resumed process never measured: the rate of the first row after a resume is the
    tokens trained since the resume over the time since, not the whole window's tokens over that time."""
    clock = {"now": 0.0}  # a clock that advances one second per training step, and never otherwise
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    real_train_step = loop.train_step

    def one_second_step(*args, **kwargs):
        clock["now"] += 1.0
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", one_second_step)
    corpus = write_corpus(tmp_path, n_train=60)
    settings = ("train.log_every=4", "train.save_every=3", "train.valid_every=100", "train.max_steps=4")
    start_run(tiny_experiment(corpus, *settings), tmp_path / "whole", quiet=True).train()
    start_run(tiny_experiment(corpus, *settings[:-1], "train.max_steps=3"), tmp_path / "cut", quiet=True).train()
    tokens_before = checkpoint_load.load_trainer_state(tmp_path / "cut" / "checkpoints" / "step-00000003")["log_window"]
    resume_run(tmp_path / "cut", overrides=["train.max_steps=4"], quiet=True).train()

    (whole,) = _rows(tmp_path / "whole")
    (cut,) = _rows(tmp_path / "cut")
    tokens_of_step_4 = 4 * whole["tokens_per_s"] - tokens_before["tokens"]  # the whole run: 4 steps in 4 s
    assert cut["tokens_per_s"] == pytest.approx(tokens_of_step_4)  # 1 step in 1 s
    assert cut["train_loss"] == whole["train_loss"]  # the loss still averages the whole window


def test_sigkilled_training_process_resumes_to_the_same_weights(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    arguments = [
        "train",
        "--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"]),
        "--valid-src", str(corpus["valid_src"]), "--valid-tgt", str(corpus["valid_tgt"]),
        "--preset", "tiny", "--vocab-size", "48", "--max-tokens", "256", "--max-steps", "120", "--device", "cpu",
        "--set", "train.save_every=5", "--set", "train.valid_every=20", "--set", "model.dropout=0.1",
        "--set", "train.warmup_steps=10", "--quiet",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tformer.cli.main", *arguments, "--out", str(killed)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (killed / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    saved = load_run(killed, which="last").step
    assert 5 <= saved < 120

    assert main([*arguments, "--out", str(killed), "--resume"]) == 0
    assert main([*arguments, "--out", str(tmp_path / "whole")]) == 0
    _assert_same_weights(killed, tmp_path / "whole")


def test_a_run_from_a_machine_with_more_gpus_resumes_with_the_generators_of_the_gpus_here(tmp_path, monkeypatch):
    """The trainer state holds one CUDA generator state per GPU of the machine that saved it; resumed on a
    machine with fewer (two saved, one here), each GPU here gets its own index's state, and the others are
    left out (torch.cuda.set_rng_state_all indexes past the last GPU and fails). The CPU stands in for the
    GPU machine: torch.cuda is replaced by what it would answer there."""
    trainer = start_run(tiny_experiment(write_corpus(tmp_path)), tmp_path / "run", quiet=True)
    state = trainer.state_dict()
    saved = [torch.full((16,), index, dtype=torch.uint8) for index in range(2)]
    state["rng"]["cuda"] = saved
    restored: list[torch.Tensor] = []

    def set_rng_state_all(states: list[torch.Tensor]) -> None:  # as torch's, for one GPU
        for index, generator_state in enumerate(states):
            if index >= torch.cuda.device_count():
                raise IndexError("tuple index out of range")
            restored.append(generator_state)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    trainer.load_state_dict(state)
    assert len(restored) == 1 and restored[0] is saved[0]


def test_the_trainer_state_keeps_the_layout_that_earlier_checkpoints_have(tmp_path: Path) -> None:
    """Checkpoints of earlier runs must resume: the trainer state's keys, nesting and value types are
    pinned here (a checkpoint taken between two log rows, with a gradient norm in its logging window)."""
    settings = ("train.max_steps=2", "train.log_every=4", "train.clip_norm=1.0")
    start_run(tiny_experiment(write_corpus(tmp_path), *settings), tmp_path / "run", quiet=True).train()
    state = checkpoint_load.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-00000002")

    assert list(state) == [
        "format_version", "step", "elapsed_s", "optimizer", "stream", "effective_batch", "threads",
        "early_stopping", "log_window", "rng",
    ]  # fmt: skip
    assert state["effective_batch"] == [1, 256, 1]  # processes, train.max_tokens, train.accumulate
    assert state["threads"] == 1  # torch's CPU threads (the one_thread fixture)
    assert (state["format_version"], state["step"], type(state["elapsed_s"])) == (ckpt.FORMAT_VERSION, 2, float)
    assert list(state["optimizer"]) == ["state", "param_groups"]
    assert {key: type(value) for key, value in state["stream"].items()} == {"epoch": int, "index": int}
    assert state["early_stopping"] == {
        "metric": "loss",
        "measured_with": {"train.label_smoothing": 0.1},  # absent in older checkpoints: counts as measured this way
        "best": None,
        "best_step": 0,
        "bad_evaluations": 0,
    }
    window = state["log_window"]
    assert [(key, type(value)) for key, value in window.items()] == [
        ("loss", float), ("nll", float), ("tokens", int), ("grad_norm", float)
    ]  # fmt: skip
    rng = state["rng"]
    assert list(rng) == ["python", "numpy", "torch", "cuda"]
    version, internal, gauss = rng["python"]
    assert (type(version), type(internal), len(internal), gauss) == (int, list, 625, None)
    kind, keys, *rest = rng["numpy"]
    assert (kind, keys.dtype, tuple(keys.shape), [type(value) for value in rest]) == (
        "MT19937", torch.int64, (624,), [int, int, float]
    )  # fmt: skip
    assert rng["torch"].dtype == torch.uint8 and isinstance(rng["cuda"], list)


def test_a_resume_with_another_effective_batch_says_so_and_how_to_keep_it(tmp_path: Path, capsys) -> None:
    """As when a run of 2 processes resumes in 1: its updates would read half as many tokens, unannounced."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=2", "train.accumulate=2", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()
    capsys.readouterr()
    resume_run(tmp_path / "run", overrides=["train.max_steps=3", "train.accumulate=1"]).train()
    assert (
        "resume: the effective batch changes from 1 process(es) x 256 x 2 = 512 to 1 x 256 x 1 = 256 padded token "
        "slots per update; --set train.accumulate=2 keeps 512\n"
    ) in capsys.readouterr().err
    resume_run(tmp_path / "run", overrides=["train.max_steps=4"]).train()  # the same: nothing to say
    assert "effective batch changes" not in capsys.readouterr().err


def test_a_cpu_resume_with_another_thread_count_says_it_is_no_longer_bit_identical(tmp_path: Path, capsys) -> None:
    """Found end to end: a run trained with 2 threads and resumed under OMP_NUM_THREADS=1 ended with other
    weights than the uninterrupted run (sums split over threads round differently), without a word."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=1", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()  # one thread (the fixture)
    capsys.readouterr()
    torch.set_num_threads(2)
    resume_run(tmp_path / "run", overrides=["train.max_steps=2"]).train()
    assert (
        "resume: torch uses 2 CPU thread(s) here, the run trained with 1: the resumed run will not be "
        "bit-identical to an uninterrupted one; OMP_NUM_THREADS=1 keeps it\n"
    ) in capsys.readouterr().err
    resume_run(tmp_path / "run", overrides=["train.max_steps=3"]).train()  # saved with 2 threads: nothing to say
    assert "CPU thread(s)" not in capsys.readouterr().err


def test_a_run_off_the_cpu_keeps_no_thread_count(tmp_path: Path) -> None:
    """A GPU run kept its machine's CPU thread count, and a CPU resume of it was told to set
    OMP_NUM_THREADS to that count to stay bit-identical, which another device never is."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=1", valid=False)
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    trainer.train()
    trainer.model.to("meta")  # any device but the CPU: no GPU needed
    assert trainer.state_dict()["threads"] is None
    assert trainer_state.thread_count_change(None, 2) is None and trainer_state.thread_count_change(16, None) is None


def test_the_effective_batch_change_names_the_accumulation_that_keeps_it_where_one_does() -> None:
    change = trainer_state.effective_batch_change
    assert change(None, [1, 256, 1]) is None  # a checkpoint from before the trainer state kept it
    assert change([2, 256, 1], [1, 256, 2]) is None  # another make-up of the same token slots
    assert change([8, 4096, 1], [4, 4096, 1]).endswith(
        "= 16,384 padded token slots per update; --set train.accumulate=2 keeps 32,768"
    )
    # no accumulation halves the batch, nor makes 3 processes' of 2
    assert change([2, 256, 1], [4, 256, 1]).endswith("= 1,024 padded token slots per update")
    assert change([3, 256, 1], [2, 256, 1]).endswith("= 512 padded token slots per update")


def test_a_trainer_trains_once_and_names_resume_run_for_going_on(tmp_path: Path) -> None:
    """A notebook's second trainer.train() after an interrupt went on without the run's lock (released when
    the first call ended), after a step cut anywhere (on a GPU, past the batches the prefetch thread had
    taken): refused, naming what continues the run from its last checkpoint."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=6", "train.save_every=2", valid=False)
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    calls = {"n": 0}

    def interrupt_in_step_4(module: torch.nn.Module, inputs: tuple) -> None:
        calls["n"] += module.training
        if calls["n"] == 4:
            raise KeyboardInterrupt

    hook = trainer.model.register_forward_pre_hook(interrupt_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    hook.remove()
    with pytest.raises(
        RuntimeError, match=r"trained already \(to step 4\); a Trainer trains once: continue the run"
    ) as refused:
        trainer.train()
    assert str(refused.value).endswith(f"with resume_run({str(tmp_path / 'run')!r}).train()")
    resumed = resume_run(tmp_path / "run", quiet=True)
    assert resumed.step == 2
    assert resumed.train().step == 6
    with pytest.raises(RuntimeError, match="trained already"):  # a finished one too
        resumed.train()


def test_a_trainer_made_before_another_trained_the_run_refuses_to_train_it(tmp_path: Path) -> None:
    """Two resume_run Trainers of one run in a notebook (the lock lets one process in): the second to train
    went on from its own older step, wrote the metrics rows of steps 5 and 6 twice and replaced the first's
    checkpoint of step 6. It is refused, naming what continues the run, and the run is as the first left it."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=4", "train.save_every=2", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()
    first = resume_run(tmp_path / "run", overrides=["train.max_steps=6"], quiet=True)
    second = resume_run(tmp_path / "run", overrides=["train.max_steps=8"], quiet=True)
    assert first.train().step == 6
    rows = (tmp_path / "run" / ckpt.METRICS_FILE).read_text()
    with pytest.raises(
        RuntimeError, match=r"has been trained to step-00000006 since this Trainer was made \(at step 4"
    ):
        second.train()
    assert (tmp_path / "run" / ckpt.METRICS_FILE).read_text() == rows
    assert resume_run(tmp_path / "run", overrides=["train.max_steps=8"], quiet=True).train().step == 8


def test_a_trainer_refused_for_a_corrupt_latest_pointer_lets_the_run_go(tmp_path: Path) -> None:
    """train() read `latest` to refuse a run trained since, and a corrupt pointer raised from there with the
    run's lock still held: no other process could train the run until the Trainer was garbage-collected."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=2", "train.warmup_steps=1", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()
    trainer = resume_run(tmp_path / "run", overrides=["train.max_steps=4"], quiet=True)
    (tmp_path / "run" / "latest").write_text(".step-00000002\n")
    with pytest.raises(ckpt.CheckpointError, match="corrupt pointer file"):
        trainer.train()
    take_lock = "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", take_lock, str(tmp_path / "run" / ".lock")]).returncode == 0


def test_resume_run_refuses_one_override_string(tmp_path: Path) -> None:
    """resume_run(RUN_DIR, overrides="train.max_steps=8") read the string's characters as overrides: "only
    train.* and decode.* may change: t"."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=2", "train.warmup_steps=1", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()
    with pytest.raises(TypeError, match=r"^overrides must be a list of 'section.key=value' strings, not one"):
        resume_run(tmp_path / "run", overrides="train.max_steps=4", quiet=True)
    assert resume_run(tmp_path / "run", overrides=["train.max_steps=4"], quiet=True).train().step == 4


def test_resume_run_applies_overrides_given_as_an_iterator(tmp_path: Path) -> None:
    """An iterator of overrides was read through once to check each is train.* or decode.*, and reached
    apply_overrides empty: the overrides were dropped without a word (the run stopped at its old max_steps)."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=2", "train.warmup_steps=1", valid=False)
    start_run(experiment, tmp_path / "run", quiet=True).train()
    trainer = resume_run(tmp_path / "run", overrides=iter(["train.max_steps=3"]), quiet=True)
    assert trainer.train_config.max_steps == 3


def test_an_interrupt_while_a_checkpoint_is_written_waits_until_latest_names_it(tmp_path: Path, monkeypatch) -> None:
    """Under torchrun another process's failure reaches rank 0 as torchrun's SIGTERM, most often while it
    writes the checkpoint of the step the others have finished. The interrupt cut the save between the
    checkpoint and `latest`: the run kept the checkpoint of a whole train.save_every before (or none)."""
    experiment = tiny_experiment(write_corpus(tmp_path), "train.max_steps=6", "train.save_every=2", valid=False)
    trainer = start_run(experiment, tmp_path / "run", quiet=True)
    write_pointer = checkpoint_save.write_pointer

    def interrupted(run_dir: Path, which: str, name: str) -> None:
        if name == "step-00000004":
            os.kill(os.getpid(), signal.SIGINT)
        write_pointer(run_dir, which, name)

    monkeypatch.setattr(checkpoint_save, "write_pointer", interrupted)
    with pytest.raises(loop.TrainingInterrupted, match=r"keeps its last checkpoint, .*step-00000004;"):
        trainer.train()
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000004"


def test_the_saved_generator_states_give_the_same_draws_again() -> None:
    """rng_state then load_rng_state: Python's, numpy's and torch's generators draw again what they drew
    after the state was taken (each of them, not only torch's, is put back)."""
    import random

    import numpy as np

    from tformer.training.rng_state import load_rng_state, rng_state

    state = rng_state()
    drawn = (random.random(), random.gauss(0.0, 1.0), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    load_rng_state(state)
    again = (random.random(), random.gauss(0.0, 1.0), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert again == drawn


def test_a_metrics_rewrite_that_fails_on_resume_says_what_to_do(tmp_path: Path, capsys, monkeypatch) -> None:
    """A full disk while metrics.jsonl was rewritten on resume ended with a bare errno line, saying
    neither that the run was unchanged nor what to do."""
    from tformer.training import metrics_log

    corpus = write_corpus(tmp_path, n_train=40)
    start_run(tiny_experiment(corpus, "train.max_steps=2"), tmp_path / "run", quiet=True).train()
    before = (tmp_path / "run" / ckpt.METRICS_FILE).read_bytes()

    def full_disk(path: Path, data: bytes) -> Path:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(metrics_log, "write_atomic", full_disk)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "4", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == (
        f"error: could not rewrite {tmp_path / 'run' / ckpt.METRICS_FILE} to drop its rows past step 2 (No space "
        f"left on device); the run is unchanged: free space on its disk (or make {tmp_path / 'run'} writable), "
        "then resume again\n"
    )  # after the warnings of a warmup above max_steps
    assert (tmp_path / "run" / ckpt.METRICS_FILE).read_bytes() == before
