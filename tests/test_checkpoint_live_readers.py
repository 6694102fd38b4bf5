"""Reading a run while another process changes it: a training run prunes its checkpoints and moves its
pointers, and `train --overwrite` renames a new run into RUN_DIR, whose checkpoints have the same names as
the old run's. Readers read a checkpoint's files one by one; each test makes the change happen between two
of those reads (a monkeypatched read), so nothing depends on timing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import trained_run

from tformer.cli.main import main
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load, checkpoint_save, load_run
from tformer.training.average import average_checkpoints
from tformer.training.checkpoint_save import write_pointer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (read-only: copy it to change it)."""
    overrides = ("train.max_steps=4", "train.save_every=2", "train.valid_every=2")
    return trained_run(tmp_path_factory.mktemp("trained"), *overrides, n_train=60)


@pytest.fixture
def runs(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """RUN_DIR and the run that `train --overwrite` will rename into its place: the same data, tokenizer and
    checkpoint names, other weights and another beam size."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    new = Path(shutil.copytree(trained, tmp_path / "new"))
    for checkpoint in ckpt.step_checkpoints(new):
        weights = checkpoint / ckpt.WEIGHTS_FILE
        save_file({name: tensor + 1 for name, tensor in load_file(weights).items()}, weights)
        experiment = checkpoint / ckpt.EXPERIMENT_FILE
        experiment.write_text(experiment.read_text().replace('"beam_size": 2', '"beam_size": 3'))
    return run, new


def _replace(run: Path, new: Path) -> None:
    """What `train --overwrite` does once its new run ends."""
    retired = run.parent / ".run.replaced"
    os.replace(run, retired)
    os.replace(new, run)
    shutil.rmtree(retired)


def _weights(loaded: checkpoint_load.LoadedRun) -> dict[str, torch.Tensor]:
    return loaded.model.state_dict()


def test_a_run_replaced_while_it_loads_is_read_whole_from_the_new_run(runs: tuple[Path, Path], monkeypatch) -> None:
    """load_run read the old run's experiment.json, then the new run's weights and tokenizer under the same
    checkpoint name: the new run's weights decoded with the old run's settings."""
    run, new = runs
    expected = load_run(new)
    read_experiment = checkpoint_load.read_experiment

    def replaced_after_reading(checkpoint: Path) -> tuple:
        read = read_experiment(checkpoint)
        if new.exists():
            _replace(run, new)
        return read

    monkeypatch.setattr(checkpoint_load, "read_experiment", replaced_after_reading)
    loaded = load_run(run)
    assert loaded.experiment.decode.beam_size == expected.experiment.decode.beam_size == 3
    assert all(torch.equal(tensor, _weights(expected)[name]) for name, tensor in _weights(loaded).items())


def test_a_checkpoint_pruned_while_it_loads_gives_way_to_the_one_the_pointer_names_now(
    runs: tuple[Path, Path], monkeypatch
) -> None:
    """A training run moves `best` and prunes the checkpoint it named while load_run reads that one: the
    read failed with `missing checkpoint file`; it now reads the checkpoint `best` names."""
    run, _ = runs
    for pointer in ckpt.POINTERS:
        write_pointer(run, pointer, "step-00000002")
    load_tokenizer = checkpoint_load.load_tokenizer

    def pruned_after_reading(checkpoint: Path):
        tokenizer = load_tokenizer(checkpoint)
        if checkpoint.name == "step-00000002":
            for pointer in ckpt.POINTERS:
                write_pointer(run, pointer, "step-00000004")
            shutil.rmtree(checkpoint)
        return tokenizer

    monkeypatch.setattr(checkpoint_load, "load_tokenizer", pruned_after_reading)
    assert load_run(run).checkpoint_dir.name == "step-00000004"


def test_info_of_a_run_whose_checkpoint_is_pruned_while_it_is_read_shows_the_one_the_pointer_names_now(
    runs: tuple[Path, Path], monkeypatch, capsys
) -> None:
    run, _ = runs
    write_pointer(run, "best", "step-00000002")
    read_experiment = checkpoint_load.read_experiment

    def pruned_after_reading(checkpoint: Path) -> tuple:
        read = read_experiment(checkpoint)
        if checkpoint.name == "step-00000002":
            write_pointer(run, "best", "step-00000004")
            shutil.rmtree(checkpoint)
        return read

    monkeypatch.setattr(checkpoint_load, "read_experiment", pruned_after_reading)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0, capsys.readouterr().err
    shown = json.loads(capsys.readouterr().out)
    assert shown["step"] == 4 and shown["best"] == "step-00000004" and shown["checkpoints"] == ["step-00000004"]


def test_an_average_never_mixes_the_checkpoints_of_a_run_and_of_the_run_that_replaced_it(
    runs: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    """`train --overwrite` renamed its new run into RUN_DIR after `average` had read the old run's first
    checkpoint: the average took in the new run's checkpoint of the same name, silently. It now averages the
    checkpoints of one run: those of the run RUN_DIR holds when it reads them."""
    run, new = runs
    expected = load_file(average_checkpoints(new, last=2, out=tmp_path / "expected") / ckpt.WEIGHTS_FILE)
    load_weights = checkpoint_load.load_weights

    def replaced_after_reading(model: torch.nn.Module, checkpoint: Path) -> None:
        load_weights(model, checkpoint)
        if new.exists():
            _replace(run, new)

    monkeypatch.setattr(checkpoint_load, "load_weights", replaced_after_reading)
    averaged = load_file(average_checkpoints(run, last=2, out=tmp_path / "averaged") / ckpt.WEIGHTS_FILE)
    assert averaged.keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in averaged.items())


def test_a_run_that_keeps_changing_while_it_is_read_is_named_in_one_line(runs: tuple[Path, Path], monkeypatch) -> None:
    run, _ = runs
    read_experiment = checkpoint_load.read_experiment
    generation = iter(range(100))

    def replaced_every_time(checkpoint: Path) -> tuple:
        read = read_experiment(checkpoint)
        copy = run.parent / f"copy-{next(generation)}"
        shutil.copytree(run, copy)
        _replace(run, copy)
        return read

    monkeypatch.setattr(checkpoint_load, "read_experiment", replaced_every_time)
    with pytest.raises(ckpt.CheckpointError, match=r"changed while it was read, 3 times .* run the command again$"):
        load_run(run)


def test_a_pruned_checkpoint_vanishes_at_once_rather_than_file_by_file(runs: tuple[Path, Path], monkeypatch) -> None:
    """Pruning deleted a checkpoint in place, file by file: `average` or `info` listing the run meanwhile found
    a step checkpoint with some of its files, and failed on the missing ones as if the checkpoint were
    damaged. It is now renamed out of sight first."""
    run, _ = runs
    for pointer in ckpt.POINTERS:
        write_pointer(run, pointer, "step-00000004")
    listed_while_deleting = []
    rmtree = shutil.rmtree

    def deleting(path: Path, *args, **kwargs) -> None:
        listed_while_deleting.extend(directory.name for directory in ckpt.step_checkpoints(run))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_save.shutil, "rmtree", deleting)
    removed = checkpoint_save.prune_checkpoints(run, keep_last=1)
    assert [path.name for path in removed] == ["step-00000002"]
    assert listed_while_deleting == ["step-00000004"]
    assert sorted(path.name for path in (run / ckpt.CHECKPOINTS_DIR).iterdir()) == ["step-00000004"]


def test_a_pruning_killed_while_it_deletes_leaves_a_hidden_directory_that_the_next_pruning_removes(
    runs: tuple[Path, Path], monkeypatch
) -> None:
    """The renamed checkpoint must stay out of sight (hidden) and be recognised as a leftover: a kill during
    the deletion otherwise left a visible directory in checkpoints/ that no later pruning removed."""
    run, _ = runs
    for pointer in ckpt.POINTERS:
        write_pointer(run, pointer, "step-00000004")

    def killed(path: Path, *args, **kwargs) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_save.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint_save.prune_checkpoints(run, keep_last=1)
    (left,) = [path.name for path in (run / ckpt.CHECKPOINTS_DIR).iterdir() if path.name != "step-00000004"]
    assert left.startswith(".old-step-00000002-")
    assert [directory.name for directory in ckpt.step_checkpoints(run)] == ["step-00000004"]
    checkpoint_save.prune_checkpoints(run, keep_last=1)
    assert sorted(path.name for path in (run / ckpt.CHECKPOINTS_DIR).iterdir()) == ["step-00000004"]


def test_a_pointer_that_moves_on_while_it_is_read_leads_to_the_checkpoint_it_names_now(
    runs: tuple[Path, Path], monkeypatch
) -> None:
    """load_run read `best`, then training moved `best` on and pruned the checkpoint it had named before
    load_run looked for it: `pointer names step-00000002, but ... is missing`."""
    run, _ = runs
    for pointer in ckpt.POINTERS:
        write_pointer(run, pointer, "step-00000004")
    read_pointer_name = checkpoint_load.read_pointer_name
    stale = iter(["step-00000002"])

    def read_before_the_move(run_dir: Path, which: str) -> str | None:
        return next(stale, None) or read_pointer_name(run_dir, which)

    shutil.rmtree(run / ckpt.CHECKPOINTS_DIR / "step-00000002")
    monkeypatch.setattr(checkpoint_load, "read_pointer_name", read_before_the_move)
    assert load_run(run).checkpoint_dir.name == "step-00000004"


def test_a_directory_gone_before_its_read_began_is_never_taken_as_unchanged(tmp_path: Path) -> None:
    """Chosen, then pruned before its identity was taken: the read that follows found whatever it found, and
    "absent before, absent after" must not count as the same directory."""
    gone = tmp_path / "checkpoints" / "step-00000002"  # chosen, and pruned at once
    reads = []

    def read(chosen: Path) -> str:
        reads.append(chosen)
        return "files of a pruned checkpoint"

    with pytest.raises(ckpt.CheckpointError, match=r"changed while it was read, 3 times"):
        checkpoint_load.read_unchanged(tmp_path, lambda: (gone, [gone]), read)
    assert len(reads) == checkpoint_load.READ_ATTEMPTS


@pytest.mark.parametrize("remover", ["pruning", "average"])
def test_what_a_killed_writer_left_may_be_removed_by_another_process_meanwhile(
    runs: tuple[Path, Path], monkeypatch, remover: str
) -> None:
    """A run's pruning and an `average` into its checkpoints both remove the `.tmp-` directory an average
    killed outright left: the one that came second stopped with FileNotFoundError (the run, at its pruning),
    where the directory it meant to remove was gone, as it wanted. Here the other process removes it between
    the check that its writer is gone and the deletion."""
    run, _ = runs
    left = Path(shutil.copytree(run / "checkpoints" / "step-00000002", run / "checkpoints" / ".tmp-averaged-1-999999"))
    abandoned = checkpoint_save.abandoned

    def removed_meanwhile(path: Path) -> bool:
        if path == left and left.exists():
            shutil.rmtree(left)  # by the other process
            return True
        return abandoned(path)

    monkeypatch.setattr(checkpoint_save, "abandoned", removed_meanwhile)
    if remover == "pruning":
        checkpoint_save.prune_checkpoints(run, keep_last=0)
    else:
        average_checkpoints(run, last=1, out=run / "checkpoints" / "averaged-1")
    assert not any(path.name.startswith(".") for path in (run / "checkpoints").iterdir())
