"""Data parallelism on CPU (gloo): two processes equal one process with the same global batch, and a
run resumes with a different number of processes.

Two processes with accumulate=1 read global batches (0, 1), (2, 3), ... of each epoch's plan, one each;
one process with accumulate=2 reads the same pairs as its two micro-batches. The model has no dropout,
so the runs must agree to float32 rounding.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_helpers import tiny_experiment, write_corpus

import tformer
from tformer.cli.main import main
from tformer.config import ConfigError
from tformer.data.tokenizer import Tokenizer
from tformer.runtime import Distributed, Rendezvous, init_distributed
from tformer.training import load_run, resume_run, start_run
from tformer.training.agreement import check_same_experiment
from tformer.training.loop import Trainer
from tformer.training.run import check_same_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ("train.max_steps=4", "train.warmup_steps=2", "train.save_every=2", "train.log_every=2", "model.dropout=0.0")


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, corpus: dict, run_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    distributed = init_distributed("cpu")
    try:
        experiment = tiny_experiment(corpus, *SETTINGS, valid=False)
        trainer = start_run(experiment, run_dir, quiet=True, distributed=distributed)
        assert trainer.objective.broadcast_buffers is False  # nothing to re-send before every forward
        trainer.train()
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.shutdown()  # what `tformer train` does: a barrier, then the process group is destroyed
    # Everything the test reads is on disk (checkpoints fsynced, metrics appended and closed). Skipping the
    # interpreter's teardown avoids a rare abort there (3 runs in ~110 here: "terminate called without
    # an active exception", SIGABRT, in the second process after its work was done).
    os._exit(0)


def _assert_close_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_run(run_a, which="last"), load_run(run_b, which="last")
    assert a.step == b.step
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def spawn_two(worker, args: tuple, *, limit_s: float = 180.0) -> None:
    """mp.spawn of two processes that stops them and fails the test once `limit_s` have passed: with join=True
    a deadlock (as gloo's teardown had below torch 2.8) held the test run for ever."""
    context = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1.0):  # raises, naming the process, if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two processes were still running after {limit_s:.0f} s (a deadlock?)")


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    spawn_two(_worker, (2, _free_port(), corpus, tmp_path / "ddp"))
    start_run(
        tiny_experiment(corpus, *SETTINGS, "train.accumulate=2", valid=False), tmp_path / "one", quiet=True
    ).train()
    _assert_close_weights(tmp_path / "ddp", tmp_path / "one")
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)
    assert state["stream"] == {"epoch": 0, "index": 8}  # global batches, whatever the process count

    # Resume the two-process run in one process (accumulating 2 to keep the global batch): it goes on
    # exactly as the one-process run does.
    resume_run(tmp_path / "ddp", overrides=["train.max_steps=6", "train.accumulate=2"], quiet=True).train()
    resume_run(tmp_path / "one", overrides=["train.max_steps=6"], quiet=True).train()
    _assert_close_weights(tmp_path / "ddp", tmp_path / "one")
    rows = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # steps 2, 4 and 6, logged once (by rank 0 only)


class _Disagreeing(Distributed):
    """Two processes in which rank 0 has other values than this process has."""

    def differs_from_main(self, values: list[float], device: torch.device) -> list[bool]:
        return [True] * len(values)


def test_processes_with_different_tokenizers_refuse_to_train(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    sources, targets = (corpus[name].read_text().splitlines() for name in ("train_src", "train_tgt"))
    tokenizer = Tokenizer.train(sources, targets, vocab_size=60)
    check_same_tokenizer(tokenizer, Distributed(), torch.device("cpu"))  # one process: nothing to compare
    with pytest.raises(ConfigError, match=r"different tokenizers.*--tokenizer DIR"):
        check_same_tokenizer(tokenizer, _Disagreeing(rank=1, world_size=2), torch.device("cpu"))


def _launch(argvs: list[list[str]], *, cwd: Path, timeout: float = 60) -> list[subprocess.CompletedProcess]:
    """Python processes of one torchrun-style job, process r given argvs[r] (`-m tformer.cli.main ...`,
    or a program that runs it; as if each machine were given its own command); returns each one's exit
    status and output."""
    return _finish(_start(argvs, cwd=cwd), timeout=timeout)


def _start(argvs: list[list[str]], *, cwd: Path, only: int | None = None) -> list[subprocess.Popen]:
    """The processes of the job (`only`: just that rank's, as if the others never started)."""
    port, world_size = _free_port(), len(argvs)
    source = str(Path(tformer.__file__).resolve().parents[1])
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env={
                **os.environ,
                "PYTHONPATH": source,
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, argv in enumerate(argvs)
        if only is None or rank == only
    ]


def _finish(processes: list[subprocess.Popen], *, timeout: float = 60) -> list[subprocess.CompletedProcess]:
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)  # a few seconds, unless the processes hang
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _train_argv(corpus: dict, out: Path, *extra: str) -> list[str]:
    experiment = ["--set", "model.preset=tiny", "--vocab-size", "48", "--max-tokens", "256", "--device", "cpu"]
    data = ["--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"])]
    return [
        "train",
        *data,
        *experiment,
        "--max-steps",
        "4",
        "--set",
        "train.warmup_steps=2",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


# `python -c FAILING_AT_STEP_3 train ...`: tformer train, failing in its third step (as out of memory would)
FAILING_AT_STEP_3 = """
import sys
import tformer.training.loop as loop
from tformer.cli.main import program
real, calls = loop.train_step, []
def failing(*args, **kwargs):
    calls.append(None)
    if len(calls) == 3:
        raise ValueError("simulated failure in step 3")
    return real(*args, **kwargs)
loop.train_step = failing
program(sys.argv[1:])
"""


def test_when_one_process_fails_the_others_say_so_in_one_line(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argv = _train_argv(corpus, out, "--set", "train.save_every=2")
    healthy, failing = _launch([["-m", "tformer.cli.main", *argv], ["-c", FAILING_AT_STEP_3, *argv]], cwd=tmp_path)
    assert (failing.returncode, failing.stderr) == (2, "error: simulated failure in step 3\n")
    assert healthy.returncode == 1
    assert healthy.stderr == (  # what the run keeps: a process killed outright (SIGKILL, OOM) says nothing itself
        "error: process 0 stops: another process of this run failed or was stopped (its own message says why); "
        f"the run keeps its last checkpoint, {out / 'checkpoints' / 'step-00000002'}; continue it with: "
        f"tformer train --out {out} --resume\n"
    )
    assert (out / "latest").read_text().strip() == "step-00000002"  # the checkpoint before the failure stays
    assert load_run(out, which="last").step == 2


# `python -c FULL_DISK train ...`: tformer train on a disk that has no room for a checkpoint
FULL_DISK = """
import errno, os, sys
import tformer.training.checkpoint_save as checkpoint_save
from tformer.cli.main import program
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
checkpoint_save.save_checkpoint = full
program(sys.argv[1:])
"""


def test_a_run_of_several_processes_that_kept_no_checkpoint_is_not_told_to_use_overwrite(tmp_path: Path) -> None:
    """Its failure advised `start afresh with --overwrite`, which every process of a torchrun job then
    refuses (`--overwrite runs in one process`)."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argv = ["-c", FULL_DISK, *_train_argv(corpus, out, "--set", "train.save_every=2")]
    main, other = _launch([argv, argv], cwd=tmp_path)
    assert (main.returncode, main.stderr) == (
        2,
        "error: could not save checkpoint step-00000002 (No space left on device); no checkpoint of "
        f"{out} was saved yet, so nothing to resume: start afresh after removing {out} (--overwrite runs in "
        "one process)\n",
    )
    assert other.returncode == 1 and other.stderr.startswith("error: process 1 stops: another process")


def test_a_diverged_run_says_what_it_keeps_once_not_in_every_process(tmp_path: Path) -> None:
    """Every process finds the non-finite loss at the same step (it is summed over all of them), and each
    printed the whole message: with 8 GPUs, 8 copies of the same advice. Rank 0 says it; the others say
    only where the run diverged, as they print only `interrupted` on Ctrl-C."""
    corpus = write_corpus(tmp_path)
    argv = [
        "-m",
        "tformer.cli.main",
        *_train_argv(corpus, tmp_path / "run", "--set", "train.schedule=peak", "--set", "train.peak_lr=1e30"),
    ]
    main, other = _launch([argv, argv], cwd=tmp_path)
    assert main.returncode == other.returncode == 2
    assert main.stderr.startswith("error: training diverged: the loss became non-finite at step ")
    assert main.stderr.endswith("; no checkpoint was saved; lower the learning rate or set train.clip_norm\n")
    step = main.stderr.split("at step ")[1].split(";")[0]
    assert other.stderr == (
        f"error: process 1 stops: training diverged at step {step} (process 0's message says what to do)\n"
    )


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_process_that_fails_before_the_processes_join_stops_the_others_at_once(
    tmp_path: Path, failing_rank: int
) -> None:
    """A config file missing on one machine fails there before the process group is joined; the others
    used to wait for it in the join until its timeout (30 minutes), without a word."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    missing = tmp_path / "only-on-the-other-machine.toml"
    argvs = [_train_argv(corpus, out), _train_argv(corpus, out)]
    argvs[failing_rank] += ["--config", str(missing)]
    started = time.monotonic()
    results = _launch([["-m", "tformer.cli.main", *argv] for argv in argvs], cwd=tmp_path, timeout=30)
    assert time.monotonic() - started < 20
    failing, healthy = results[failing_rank], results[1 - failing_rank]
    assert failing.returncode == 2
    assert failing.stderr.startswith(f"error: config file not found: {missing}")
    assert (healthy.returncode, healthy.stderr) == (
        1,
        f"error: process {1 - failing_rank} stops: another process of this run failed or was stopped "
        "(its own message says why)\n",
    )
    assert not out.exists()


def test_overwrite_under_torchrun_is_refused_by_every_process(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    argv = ["-m", "tformer.cli.main", *_train_argv(corpus, out, "--overwrite")]
    for result in _launch([argv, argv], cwd=tmp_path):
        assert (result.returncode, result.stderr) == (
            2,
            "error: --overwrite runs in one process; remove RUN_DIR first to start a run with torchrun\n",
        )
    assert out.is_dir() and not any(out.iterdir())


def test_a_torchrun_job_refused_its_directory_is_told_to_remove_it_not_to_use_overwrite(tmp_path: Path) -> None:
    """A new run into a directory holding a run, or what a run killed before its first checkpoint leaves,
    and a resume of the latter, advised --overwrite, which every process of a torchrun job refuses (above):
    they now say to remove the directory."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.0}\n')
    new = ["-m", "tformer.cli.main", *_train_argv(corpus, out)]
    resume = ["-m", "tformer.cli.main", *_train_argv(corpus, out, "--resume")]
    one = "(--overwrite runs in one process)"
    cases = [
        (new, f"{out} already holds files; no checkpoint to resume: remove them {one}, or choose another --out"),
        (
            resume,
            f"nothing to resume in {out}: it holds no finished checkpoint; start afresh after removing {out} {one}",
        ),
    ]
    for argv, message in cases:
        for result in _launch([argv, argv], cwd=tmp_path):
            assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    (out / "latest").write_text("step-00000004\n")  # a run's, as far as a new run's check looks
    for result in _launch([new, new], cwd=tmp_path):
        message = f"{out} already holds a run; pass --resume to continue it, or remove it to start afresh {one}"
        assert (result.returncode, result.stderr) == (2, f"error: {message}\n")


def test_processes_given_different_settings_refuse_to_train_naming_the_setting(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argvs = [_train_argv(corpus, out), _train_argv(corpus, out, "--max-steps", "3")]
    results = _launch([["-m", "tformer.cli.main", *argv] for argv in argvs], cwd=tmp_path)
    for rank, (result, here) in enumerate(zip(results, (4, 3), strict=True)):
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"error: process {rank}: --max-steps differs between the processes of this run (here {here}); "
            "give every machine the same command, and the same files at the same paths\n"
        )
    assert not out.exists()


_SENT: list[list[float]] = []  # what _Recording broadcast, in order


class _Recording(Distributed):
    """Rank 0 of two: records the values it would broadcast."""

    def differs_from_main(self, values: list[float], device: torch.device) -> list[bool]:
        _SENT.append(list(values))
        return [False] * len(values)


class _Comparing(Distributed):
    """Rank 1 of two: compares its values with those `_Recording` sent."""

    def differs_from_main(self, values: list[float], device: torch.device) -> list[bool]:
        main = _SENT.pop(0)
        return [mine != theirs for mine, theirs in zip(values, main, strict=True)]


def test_processes_reading_different_data_at_the_same_path_refuse_to_train(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    experiment = tiny_experiment(corpus)
    cpu = torch.device("cpu")
    check_same_experiment(experiment, _Recording(rank=0, world_size=2), cpu)
    check_same_experiment(experiment, _Comparing(rank=1, world_size=2), cpu)  # the same files: no error
    check_same_experiment(experiment, _Recording(rank=0, world_size=2), cpu)
    corpus["valid_tgt"].write_text("another copy\n", encoding="utf-8")
    message = rf"process 1: the file of data.valid_tgt differs .*\(here {corpus['valid_tgt']}: 13 bytes, BLAKE2b"
    with pytest.raises(ConfigError, match=message):
        check_same_experiment(experiment, _Comparing(rank=1, world_size=2), cpu)


def _cli_worker(rank: int, port: int, argvs: list[list[str]], report: Path) -> None:
    """`tformer` as process `rank` of a torchrun job; writes its exit status and whether it is still in
    the process group when `main` returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(len(argvs))
    torch.set_num_threads(1)
    status = main(argvs[rank])
    (report / f"rank{rank}").write_text(f"{status} {dist.is_initialized()}")
    os._exit(0)


def test_a_process_that_stops_on_an_error_leaves_the_process_group_before_it_exits(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argvs = [_train_argv(corpus, out), _train_argv(corpus, out, "--max-steps", "3")]
    spawn_two(_cli_worker, (_free_port(), argvs, tmp_path))
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["2 False", "2 False"]


# `python -c VALIDATING_OTHERWISE train ...`: tformer train whose validation loss only grows (as if this
# process's GPU computed it a little differently, enough to tip early stopping)
VALIDATING_OTHERWISE = """
import sys
import tformer.training.validator as validator
from tformer.cli.main import main
real, calls = validator.validation_loss, []
def growing(*args, **kwargs):
    calls.append(None)
    return {**real(*args, **kwargs), "valid_loss": 100.0 + len(calls)}
validator.validation_loss = growing
sys.exit(main(sys.argv[1:]))
"""


def test_every_process_takes_rank_0s_validation_so_they_stop_at_the_same_step(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    data = ["--valid-src", str(corpus["valid_src"]), "--valid-tgt", str(corpus["valid_tgt"])]
    stopping = ["--set", "train.valid_every=1", "--set", "train.patience=1", "--set", "train.stop_metric=loss"]
    argv = _train_argv(corpus, out, *data, *stopping)
    results = _launch([["-m", "tformer.cli.main", *argv], ["-c", VALIDATING_OTHERWISE, *argv]], cwd=tmp_path)
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    # torch 2.8 and 2.9's gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks. ..." on stdout as it joins
    stdout = "".join(line for line in results[0].stdout.splitlines(keepends=True) if not line.startswith("[Gloo] "))
    assert stdout == f"run {out}: step 4, reached max_steps=4\n"  # rank 0's loss kept improving


@pytest.mark.parametrize("elsewhere", ["absent", "made on each machine"])
def test_a_run_directory_another_machine_cannot_see_is_refused_at_the_start(tmp_path: Path, elsewhere: str) -> None:
    corpus = write_corpus(tmp_path)
    out, other_machines = tmp_path / "run", tmp_path / "other" / "run"  # where process 1 looks: not shared
    if elsewhere != "absent":
        other_machines.mkdir(parents=True)
    argvs = [_train_argv(corpus, out), _train_argv(corpus, other_machines)]
    results = _launch([["-m", "tformer.cli.main", *argv] for argv in argvs], cwd=tmp_path)
    advice = "with several machines, --out must be on a filesystem they all share"
    assert [result.returncode for result in results] == [2, 2]
    assert results[0].stderr == (
        f"error: process 0: {out} is where process 0 writes the run, but another process cannot see it: {advice}\n"
    )
    assert results[1].stderr == (
        f"error: process 1: {other_machines} is where process 0 writes the run, but it is not there on this "
        f"machine: {advice}\n"
    )
    assert not out.exists()


def test_sigterm_passed_on_by_torchrun_ends_the_run_with_the_line_naming_its_checkpoint(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argv = ["-m", "tformer.cli.main", *_train_argv(corpus, out, "--max-steps", "100000", "--set", "train.save_every=2")]
    processes = _start([argv, argv], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (out / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # a checkpoint exists: training is under way
    for process in processes:  # what torchrun does with the SIGTERM it receives
        process.send_signal(signal.SIGTERM)
    main_process, other = _finish(processes)
    last = out / "checkpoints" / (out / "latest").read_text().strip()
    assert main_process.returncode == 130, main_process.stderr
    assert main_process.stderr == (
        f"interrupted: the run keeps its last checkpoint, {last}; "
        f"continue it with: tformer train --out {out} --resume\n"
    )
    lost = "error: process 1 stops: another process of this run failed or was stopped (its own message says why)\n"
    assert (other.returncode, other.stderr) in ((130, "interrupted\n"), (1, lost))
    assert load_run(out, which="last").checkpoint_dir == last


class _Stream:
    """The part of a BatchStream that `Trainer.load_stream_state` uses."""

    def __init__(self) -> None:
        self.state = {"epoch": 0, "index": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def global_batches(self, epoch: int) -> int:
        return 11  # every epoch's plan


@pytest.mark.parametrize(
    ("world_size", "index", "local", "skipped"),
    # at the end of the epoch's 11 batches nothing is left to skip (the message used to say 1 and 3)
    [(3, 8, 3, 1), (4, 5, 2, 3), (2, 8, 4, 0), (2, 11, 6, 0), (4, 10, 3, 1), (4, 9, 3, 2)],
)
def test_a_resume_that_skips_batches_says_how_many(world_size, index, local, skipped, capsys) -> None:
    trainer = SimpleNamespace(
        distributed=Distributed(rank=0, world_size=world_size), data=SimpleNamespace(stream=_Stream()), quiet=False
    )
    trainer._say = MethodType(Trainer._say, trainer)
    Trainer.load_stream_state(trainer, {"epoch": 2, "index": index})
    assert trainer.data.stream.state == {"epoch": 2, "index": local}
    err = capsys.readouterr().err
    if skipped:
        assert err == (
            f"resume: {world_size} processes continue epoch 2 at global batch {local * world_size} "
            f"(a multiple of {world_size}), skipping {skipped} batch(es) after the {index} trained "
            "(none is read twice)\n"
        )
    else:
        assert err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_asked_for_on_a_machine_without_one_is_a_one_line_error_under_torchrun(tmp_path: Path) -> None:
    """Every process used to fail in torch.cuda.set_device with an AttributeError's traceback."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argv = ["-m", "tformer.cli.main", *_train_argv(corpus, out), "--device", "cuda"]
    for result in _launch([argv, argv], cwd=tmp_path):
        assert (result.returncode, result.stderr) == (
            2,
            "error: --device cuda but no CUDA device is available; use --device cpu\n",
        )
    assert not out.exists()


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    message = r"^process 2 has LOCAL_RANK=2 and would use cuda:2, but this machine has 2 CUDA device\(s\): start"
    with pytest.raises(ConfigError, match=message):
        init_distributed("cuda")


# `python -c STARTED train ...`: tformer train that says when torch is imported (SIGTERM is held until then)
STARTED = """
import sys
import torch
print("started", flush=True)
from tformer.cli.main import program
program(sys.argv[1:])
"""


@pytest.mark.parametrize("alone", [0, 1])
def test_a_process_whose_peers_never_start_takes_sigterm_while_it_waits_for_them(tmp_path: Path, alone: int) -> None:
    """Started without torchrun and without the other process, rank 0 waited in torch's store for it (rank 1
    for rank 0's store) for 30 minutes, taking neither Ctrl-C nor SIGTERM."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    argv = ["-c", STARTED, *_train_argv(corpus, out)]
    (process,) = _start([argv, argv], cwd=tmp_path, only=alone)
    assert process.stdout is not None and process.stdout.readline() == "started\n"
    time.sleep(2)  # in the rendezvous by now
    process.send_signal(signal.SIGTERM)
    (result,) = _finish([process], timeout=20)
    assert (result.returncode, result.stderr) == (130, "interrupted\n")
    assert not out.exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_whose_peers_never_start_gives_up_in_one_line(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    advice = r" within 0:00:00.500000; start every process of the job \(torchrun starts them"
    if rank == 1:
        message = rf"^process 0 of this run \(MASTER_ADDR=127.0.0.1, MASTER_PORT=\d+\) did not start{advice}"
        with pytest.raises(ConfigError, match=message):
            Rendezvous(timeout=timedelta(seconds=0.5))
        return
    rendezvous = Rendezvous(timeout=timedelta(seconds=5))
    message = rf"^only 1 of the WORLD_SIZE=2 processes of this run were ready to join{advice}"
    with pytest.raises(ConfigError, match=message):
        rendezvous.wait_for_all(timeout=timedelta(seconds=0.5))
