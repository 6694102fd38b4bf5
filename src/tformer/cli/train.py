"""Train a translation model from parallel text.

Configuration comes from a TOML file (--config), then the plain flags, then --set section.key=value
(later wins). --config takes a file or the name of a recipe that ships with tformer: tiny_copy,
multi30k_en_de, multi30k_de_en or multi30k_en_de_cpu (see docs/training.md). A tokenizer is trained
on the training data unless data.tokenizer names one. RUN_DIR receives checkpoints and metrics.jsonl.
A default below applies where neither the config file nor --set gives the key (with --resume: the run's).

--out must be empty or absent unless one of:
  --resume     continue RUN_DIR from its last checkpoint: repeat the original command with --resume,
               or give only what changes (--max-steps/--max-time/..., --set train.*/decode.*).
               Settings not given keep the run's values; a model or data setting given must equal
               the run's. On CPU the result equals an uninterrupted run bit for bit
               (with the same number of threads, OMP_NUM_THREADS).
  --overwrite  replace RUN_DIR, all of it (files you added there too). The new run is written next to
               it (a hidden .NAME.overwrite-PID directory) and takes RUN_DIR's place only when training
               ends, so a failed or interrupted new run never destroys the old one (and its hidden
               directory is removed; those of processes killed outright are removed by the next
               --overwrite). One process only: under torchrun, remove RUN_DIR instead.

Several processes (one per GPU, on one or many machines) are started with torchrun, e.g.
  torchrun --nproc-per-node 8 -m tformer.cli.main train --config run.toml --out RUN_DIR
(see docs/training.md); only rank 0 writes RUN_DIR.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tformer.cli.argument_types import path_argument
from tformer.cli.out_of_memory import is_out_of_memory, reason
from tformer.cli.typed_names import errors_named_as_typed
from tformer.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    experiment_from_dict,
    load_toml,
    set_key,
)
from tformer.termination import sigterm_as_interrupt

if TYPE_CHECKING:
    from tformer.runtime import Distributed, Rendezvous
    from tformer.training.loop import TrainResult

HELP = "train a translation model (new run, --resume, or --overwrite)"

# flag -> (section, key): plain flags are shorthands for --set section.key=value
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "data_dir": ("data", "data_dir"),
    "train_src": ("data", "train_src"),
    "train_tgt": ("data", "train_tgt"),
    "valid_src": ("data", "valid_src"),
    "valid_tgt": ("data", "valid_tgt"),
    "tokenizer": ("data", "tokenizer"),
    "vocab_size": ("data", "vocab_size"),
    "preset": ("model", "preset"),
    "max_tokens": ("train", "max_tokens"),
    "max_steps": ("train", "max_steps"),
    "max_epochs": ("train", "max_epochs"),
    "max_time": ("train", "max_time_s"),
    "device": ("train", "device"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the description's lists keep their lines
    parser.add_argument(
        "--config",
        type=path_argument,
        help="experiment TOML file, or the name of a recipe shipped with tformer (e.g. tiny_copy)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key, e.g. train.max_steps=100 (the value is TOML; repeatable)",
    )
    parser.add_argument("--out", type=path_argument, required=True, metavar="RUN_DIR", help="run directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR once the new one ends")
    parser.add_argument("--data-dir", help="directory that relative data paths are read from (data.data_dir)")
    parser.add_argument("--train-src", help="training source text, one sentence per line")
    parser.add_argument("--train-tgt", help="training target text, aligned with --train-src")
    parser.add_argument("--valid-src", help="validation source text")
    parser.add_argument("--valid-tgt", help="validation target text")
    parser.add_argument("--tokenizer", help="directory of an existing tokenizer (default: train one)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size of the tokenizer trained here (default: 8000)")
    parser.add_argument("--preset", choices=list(PRESETS), help="model shape preset (default: base's shape)")
    parser.add_argument("--max-tokens", type=int, help="token budget of one micro-batch (padded slots; default: 4096)")
    parser.add_argument("--max-steps", type=int, help="stop after this many updates (default: 100000; 0: no limit)")
    parser.add_argument("--max-epochs", type=int, help="stop after this many epochs (default: 0, no limit)")
    parser.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="wall-clock training budget of the whole run, resumptions included (default: 0, no limit)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines (warnings still show)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="layers",
        default="none",
        choices=["layers", "model"],
        help="torch.compile each encoder/decoder layer in place (--compile alone, or layers), or the whole model "
        "and loss with CUDA graphs on a GPU (model: a new recording per batch shape, so it suits shapes that repeat; "
        "with --set train.cuda_graphs=true the step's own graphs record it, the fastest GPU step); default: no "
        "compilation",
    )
    parser.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        metavar="N",
        help="compute the output projection and loss N target positions at a time, recomputed in backward "
        "(saves the memory of the full logits; default: 0, off)",
    )


def run(args: argparse.Namespace) -> int:
    """SIGTERM (what schedulers, `timeout` and `kill` send; torchrun passes it on to its processes) is
    taken like Ctrl-C: the run says what it kept and an --overwrite removes its hidden directory. A
    process waiting in a collective takes it when the collective returns, which it does as soon as
    another process has stopped (torchrun kills any left after 30 s)."""
    replacing = args.overwrite and args.out.exists()  # a failed new run is then discarded, the old one kept
    try:
        with sigterm_as_interrupt():
            return _run_either(args)
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise TrainingOutOfMemoryError(_out_of_memory_line(error, args.out, replacing=replacing)) from None


class TrainingOutOfMemoryError(ValueError):
    """Training ran out of memory; the message names the settings that take less and what the run kept."""


def _out_of_memory_line(error: BaseException, out: Path, *, replacing: bool) -> str:
    """What the main entry point's generic "a smaller beam, batch or model" left out for training: the
    settings that lower a training step's memory, and that the run keeps its last checkpoint (an out of
    memory in the middle of a run is no reason to start again)."""
    from tformer.training.errors import what_was_kept

    line = (
        f"out of memory ({reason(error)}); lower --max-tokens (train.max_tokens), pass --loss-chunk 1024 "
        "or train a smaller model"
    )
    if replacing:
        return f"{line}; {_previous_run_kept(out)}"
    return f"{line}; {what_was_kept(out, processes=_processes())}" if out.is_dir() else line


def _previous_run_kept(out: Path) -> str:
    """What a replacing run (--overwrite) that failed keeps: nothing of its own, the previous run in `out`."""
    return f"the new run was discarded; {out} keeps the previous run unchanged"


def _run_either(args: argparse.Namespace) -> int:
    # the checks name config keys: each key that a flag set is named by that flag, unless a --set (which
    # comes after the flags) replaced it
    overridden = {entry.split("=", 1)[0].strip() for entry in args.set}
    with errors_named_as_typed(args, FLAG_KEYS, overridden=overridden):
        return _run_one_of_several(args) if _processes() > 1 else _run(args)


def _processes() -> int:
    """How many processes run this command: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _run_one_of_several(args: argparse.Namespace) -> int:
    """Under torchrun, a process that fails says why and exits; the others learn of it only when their
    next collective fails, or, before the processes have joined, from the rendezvous store at once.
    They say so in one line, not with the transport's traceback. However it ends, the process leaves
    the process group before it exits."""
    from tformer.runtime import Rendezvous, leave_process_group, lost_contact

    rendezvous = Rendezvous()  # first: nothing that may fail in this process alone comes before it
    try:
        return _run(args, rendezvous)
    except BaseException as error:
        rendezvous.abandon()  # processes still waiting to join stop now, not at the join's timeout
        if not (isinstance(error, RuntimeError) and lost_contact(error)):
            raise
        print(
            f"error: process {os.environ.get('RANK', '?')} stops: another process of this run failed or was "
            f"stopped (its own message says why){_kept_by_main(args.out)}",
            file=sys.stderr,
        )
        return 1
    finally:
        leave_process_group()


def _kept_by_main(out: Path) -> str:
    """What process 0 adds to its line when another process stopped the run: the checkpoint the run keeps
    and how to resume it. A process killed outright (SIGKILL, the memory killer) says nothing of its own,
    so no line said that the run could go on, nor from where. Empty elsewhere, or before a checkpoint."""
    from tformer.training import checkpoint as ckpt
    from tformer.training.errors import what_was_kept

    try:
        kept = os.environ.get("RANK") == "0" and ckpt.read_pointer_name(out, "latest") is not None
    except (OSError, ckpt.CheckpointError):
        kept = False
    return f"; {what_was_kept(out, processes=_processes())}" if kept else ""


def _run(args: argparse.Namespace, rendezvous: Rendezvous | None = None) -> int:
    from tformer.training.run import start_run
    from tformer.training.run_directory import check_new_run_dir
    from tformer.training.run_lock import RunLock

    out: Path = args.out
    if args.loss_chunk < 0:
        raise ConfigError(f"--loss-chunk must be 0 (off) or positive, got {args.loss_chunk}")
    if args.resume:
        return _resume(args, rendezvous)
    experiment = _experiment(args)
    # the checks of --out come before the processes join: one that stops alone there leaves none waiting
    if not args.overwrite or not out.exists():
        _check_new_out(out)
        options = _runtime(args, experiment.train.device, rendezvous)
        result = start_run(experiment, out, quiet=args.quiet, **options).train()
        options["distributed"].shutdown()  # after a failure the process just exits: a barrier could hang
        _report(options["distributed"], f"run {out}: step {result.step}, {result.stop_reason}")
        return 0
    if not out.is_dir():
        raise ConfigError(f"--overwrite replaces a run directory, but {out} is a file")
    # a symbolic link to a run: replace the run it names and keep the link (renaming the link itself away
    # put the new run in its place, left the old run where it was and failed on rmtree of the link)
    out = out.resolve() if out.is_symlink() else out
    _check_replaceable(out)
    _check_data_outside(experiment, out)
    if _processes() > 1:
        raise ConfigError("--overwrite runs in one process; remove RUN_DIR first to start a run with torchrun")
    options = _runtime(args, experiment.train.device, rendezvous)
    _remove_abandoned_stagings(out, quiet=args.quiet)
    staging = out.parent / f"{_hidden_prefix(out, 'overwrite')}{os.getpid()}"
    check_new_run_dir(staging)
    old_run = RunLock(out)  # a run that another process is still training is not replaced under it
    try:
        result = _train_staged(experiment, staging, out, quiet=args.quiet, options=options)
        _swap_in(staging, out, done=f"run {out} (replaced the previous run): step {result.step}, {result.stop_reason}")
    finally:
        old_run.release()
    return 0


def _check_new_out(out: Path) -> None:
    """--out of a new run: empty or absent. One that a run trains into now is refused as such, naming its
    process: 'already holds a run; pass --resume' (or files, 'pass --overwrite') led to a second refusal."""
    from tformer.training.run_directory import RunDirectoryError, check_new_run_dir, new_run_advice
    from tformer.training.run_lock import LOCK_FILE, RunLock

    try:
        check_new_run_dir(out, **new_run_advice(processes=_processes()))
    except RunDirectoryError:
        if _processes() == 1 and (out / LOCK_FILE).is_file() and not (out / LOCK_FILE).is_symlink():
            RunLock(out).release()  # refused (RunInUseError) while another process holds it
        raise


def _swap_in(staging: Path, out: Path, *, done: str) -> None:
    """Put the finished new run in `staging` in the place of the old run in `out`, delete the old one, and
    print `done`. Ctrl-C and SIGTERM wait until it is said: one between the two renames left no RUN_DIR at all
    (both runs hidden beside it), one during the deletion a hidden half-deleted `.NAME.replaced-PID` for good,
    and one taken before the line ended the command with only `interrupted`, though the new run was in place."""
    from tformer.termination import interrupts_held

    retired = out.parent / f"{_hidden_prefix(out, 'replaced')}{os.getpid()}"
    with interrupts_held():
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired)
        print(done)


def _hidden_prefix(out: Path, kind: str) -> str:
    """`.NAME.KIND-`, the name of a hidden directory beside RUN_DIR before its process id, NAME cut as
    write_atomic cuts it (a RUN_DIR near the file system's limit failed with "File name too long", naming a
    directory the user never gave)."""
    from tformer.atomic_file import NAME_KEPT

    return f".{out.name[:NAME_KEPT]}.{kind}-"


def _remove_abandoned_stagings(out: Path, *, quiet: bool) -> None:
    """Hidden directories of earlier --overwrite runs of RUN_DIR whose process is gone (killed with
    SIGKILL, or by SIGTERM during a step that could not be interrupted) hold a whole run each that nothing
    else will ever use: remove them before staging a new one. So do the replaced runs such a process was
    deleting when it was killed (`.NAME.replaced-PID`: RUN_DIR holds the run that replaced it)."""
    from tformer.atomic_file import abandoned

    prefixes = [_hidden_prefix(out, kind) for kind in ("overwrite", "replaced")]
    stagings = [staging for prefix in prefixes for staging in out.parent.glob(glob.escape(prefix) + "*")]
    for staging in sorted(stagings):
        if not any(staging.name.removeprefix(prefix).isdigit() for prefix in prefixes):
            continue  # not a name --overwrite gives (.run.overwrite-keep-123): the user's own
        if staging.is_dir() and abandoned(staging):
            shutil.rmtree(staging)
            if not quiet:
                print(f"removed {staging}: the hidden directory of an earlier --overwrite whose process is gone")


def _check_replaceable(out: Path) -> None:
    """--overwrite deletes RUN_DIR once the new run ends: refuse a directory that is no run (a data
    directory, a home directory given by mistake), unless it holds only what a run killed before its
    first checkpoint leaves."""
    from tformer.training.run_directory import foreign_files, replaceable

    if not replaceable(out):
        others = foreign_files(out)
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise ConfigError(
            f"--overwrite replaces a run, but {out} holds no run (it holds {others[0]}{more}), and would be "
            "deleted; choose another --out, or remove it yourself"
        )


def _check_data_outside(experiment: ExperimentConfig, out: Path) -> None:
    """--overwrite deletes RUN_DIR once the new run ends: refuse training or validation text kept inside
    it, which the new run reads (and a --resume of it reads again) but would delete."""
    from tformer.training.training_text import absolute_data_paths

    data = absolute_data_paths(experiment.data)
    for name in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
        path = getattr(data, name)
        if path is not None and out.resolve() in Path(path).parents:
            raise ConfigError(
                f"--overwrite would delete {path} (data.{name}), which the new run reads from inside {out}; "
                "move it out of the run directory first"
            )


def _train_staged(
    experiment: ExperimentConfig, staging: Path, out: Path, *, quiet: bool, options: dict[str, Any]
) -> TrainResult:
    """Train the replacing run in `staging`; if it fails or is interrupted, remove what it wrote there,
    so that the old run in `out` stays and nothing hidden is left beside it."""
    from tformer.training.errors import DIVERGED_ADVICE, diverged_line
    from tformer.training.loop import CheckpointSaveError, TrainingDivergedError, TrainingInterrupted
    from tformer.training.run import start_run

    kept = _previous_run_kept(out)
    try:
        # the old run's encoded training data, hard-linked, when the new one would encode the same
        trainer = start_run(experiment, staging, quiet=quiet, encoded_from=out, **options)
        trainer.final_run_dir = out  # renamed into place once it succeeds: name its checkpoints there
        return trainer.train()
    except KeyboardInterrupt as interrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingInterrupted(kept) from interrupt
    except CheckpointSaveError as error:  # what the staged run "kept" is removed with it
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointSaveError(error.failure, kept) from error
    except TrainingDivergedError as error:  # its "last good checkpoint" too
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingDivergedError(diverged_line(error.step, f"{kept}; {DIVERGED_ADVICE}"), step=error.step) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """Config file, then plain flags, then --set overrides, over the defaults."""
    from tformer.training.run import check_no_tokenizer_keys

    given = _given_settings(args)
    check_no_tokenizer_keys(given)
    return experiment_from_dict(given)


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The nested tables that the command itself sets: config file, then plain flags, then --set."""
    values = load_toml(args.config) if args.config is not None else {}
    values = apply_overrides(values, [])  # a copy with every table as a dict
    for flag, (section, key) in FLAG_KEYS.items():
        value: Any = getattr(args, flag)
        if value is not None:
            set_key(values, section, key, value)
    return apply_overrides(values, args.set)


def _resume(args: argparse.Namespace, rendezvous: Rendezvous | None) -> int:
    """Whatever the command sets is laid over the run's own experiment: repeating the original command
    and giving only what changes both work, and a model or data setting that differs is named."""
    from tformer.training.resume import resume_run, resumed_experiment

    expected = resumed_experiment(args.out, _given_settings(args), processes=_processes())
    options = _runtime(args, expected.train.device, rendezvous)
    trainer = resume_run(args.out, expected=expected, quiet=args.quiet, **options)
    result = trainer.train()
    options["distributed"].shutdown()
    _report(options["distributed"], f"run {args.out}: step {result.step}, {result.stop_reason}")
    return 0


def _report(distributed: Distributed, line: str) -> None:
    """The run's closing line, printed once: by rank 0 (the only process that writes log lines)."""
    if distributed.is_main:
        print(line)


def _runtime(args: argparse.Namespace, device: str, rendezvous: Rendezvous | None) -> dict[str, Any]:
    """How the run executes (not what it computes): process group, compilation, loss chunking."""
    from tformer.runtime import init_distributed

    distributed: Distributed = init_distributed(device, rendezvous)
    return {"distributed": distributed, "compile_mode": args.compile, "loss_chunk": args.loss_chunk}
