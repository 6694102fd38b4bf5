"""`tformer translate --output FILE`: written as FILE.partial and renamed once complete, so a job that stops
leaves its whole translated lines under a name that says so; an existing FILE is never replaced unasked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export_hf import SENTENCES, make_run

from tformer.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("translate") / "run")


def test_a_job_that_stops_leaves_its_translated_lines_in_output_partial_not_in_output(
    run, tmp_path, capsys, monkeypatch
):
    from tformer.cli import line_input

    ready_chunks = line_input.ready_chunks
    monkeypatch.setattr(line_input, "ready_chunks", lambda fd, max_lines: ready_chunks(fd, 4))
    lines = [SENTENCES[i % len(SENTENCES)] for i in range(12)]
    lines[9] = "the cat " * 40  # over the model's 64 positions: stops the job in the third chunk of 4 lines
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    translate = ["translate", str(run), "--input", str(source), "--output", str(output), "--beam", "1"]
    assert main(translate) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input line 10 has") and err.count("\n") == 1, err
    assert f"the translations of the first 8 input lines are in {output}.partial" in err
    assert not output.exists()  # a prefix never looks like the whole translation
    kept = (tmp_path / "out.txt.partial").read_text(encoding="utf-8")
    assert kept.endswith("\n") and len(kept.splitlines()) == 8

    source.write_text("\n".join(lines[:9] + lines[10:]) + "\n", encoding="utf-8")
    assert main([*translate, "--overwrite"]) == 0
    assert len(output.read_text(encoding="utf-8").splitlines()) == 11
    assert output.read_text(encoding="utf-8").splitlines()[:8] == kept.splitlines()  # the same lines
    assert not (tmp_path / "out.txt.partial").exists()


@pytest.mark.parametrize("failing_chunk", [1, 3])
def test_running_out_of_memory_says_what_output_partial_keeps(run, tmp_path, capsys, monkeypatch, failing_chunk):
    """An out of memory in the third chunk of 4 lines ended with the generic one line, saying nothing of the
    8 lines kept in OUTPUT.partial; in the first chunk, it left an empty OUTPUT.partial behind."""
    from tformer.cli import line_input
    from tformer.decoding import pipeline

    ready_chunks = line_input.ready_chunks
    monkeypatch.setattr(line_input, "ready_chunks", lambda fd, max_lines: ready_chunks(fd, 4))
    translate_chunk = pipeline.Translator._translate_chunk
    chunks: list[int] = []

    def fails(self, chunk, first_line):
        chunks.append(first_line)
        if len(chunks) == failing_chunk:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5734400 bytes.")
        return translate_chunk(self, chunk, first_line)

    monkeypatch.setattr(pipeline.Translator, "_translate_chunk", fails)
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(f"{SENTENCES[i % len(SENTENCES)]}\n" for i in range(12)), encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output), "--beam", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (DefaultCPUAllocator: can't allocate memory: ") and err.count("\n") == 1
    assert not output.exists()
    if failing_chunk == 1:
        assert err.endswith("a smaller beam, batch or model needs less\n")
        assert not (tmp_path / "out.txt.partial").exists()
    else:
        assert err.endswith(f"needs less; the translations of the first 8 input lines are in {output}.partial\n")
        assert len((tmp_path / "out.txt.partial").read_text(encoding="utf-8").splitlines()) == 8


def test_sigterm_says_how_many_lines_output_partial_keeps(run, tmp_path):
    """`kill` and `timeout` send SIGTERM: like Ctrl-C, the job ends with one line naming what it kept."""
    output = tmp_path / "out.txt"
    command = [sys.executable, "-m", "tformer.cli.main", "translate", str(run), "--output", str(output), "--beam", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True)
    job.stdin.write(f"{SENTENCES[0]}\n{SENTENCES[1]}\n")  # the input stays open: the job waits for more
    job.stdin.flush()
    partial = tmp_path / "out.txt.partial"
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        if partial.exists() and partial.read_text(encoding="utf-8").count("\n") == 2:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    assert err == f"interrupted: the translations of the first 2 input lines are in {partial}\n"
    assert len(partial.read_text(encoding="utf-8").splitlines()) == 2 and not output.exists()


def test_an_existing_output_is_kept_unless_overwrite_is_given(run, tmp_path, capsys):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    output.write_text("translations saved before\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output: {output} exists; pass --overwrite to replace it, or choose another file\n"
    assert output.read_text(encoding="utf-8") == "translations saved before\n"

    output.unlink()
    (tmp_path / "out.txt.partial").write_text("lines of a stopped job\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output)]) == 2
    assert f"{output}.partial exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out.txt.partial").read_text(encoding="utf-8") == "lines of a stopped job\n"

    output.write_text("translations saved before\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output), "--overwrite"]) == 0
    assert len(output.read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
    assert not (tmp_path / "out.txt.partial").exists()


def _busy(output: Path) -> str:
    writing = f"another process is writing {output}.partial now"
    return f"error: --output {output}: {writing}; wait for it to end, or choose another file\n"


def _another_writer_meanwhile(monkeypatch, path: Path, text: str) -> None:
    """Another process writes `path` while this command loads its model, after its check of existing files."""
    from tformer.training import checkpoint_load

    load_run = checkpoint_load.load_run

    def load_while_another_writes(*args, **kwargs):
        path.write_text(text, encoding="utf-8")
        return load_run(*args, **kwargs)

    monkeypatch.setattr(checkpoint_load, "load_run", load_while_another_writes)


@pytest.mark.parametrize("written", ["out.txt.partial", "out.txt"])
def test_two_commands_given_one_output_at_once_never_write_into_each_others(
    run, tmp_path, capsys, monkeypatch, written
):
    """Both passed the check of existing files while their models loaded: the second opened the first's
    OUTPUT.partial, emptied it and wrote into it (or renamed its own over the OUTPUT the first had just
    completed), and the first to finish named OUTPUT a file holding the other's lines, with status 0."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    _another_writer_meanwhile(monkeypatch, tmp_path / written, "the other command's lines\n")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --output {output}"), err
    assert (tmp_path / written).read_text(encoding="utf-8") == "the other command's lines\n"
    if written == "out.txt":  # this command's translations are kept beside it, and the line says where
        assert f"the translations are in {output}.partial" in err
        assert len((tmp_path / "out.txt.partial").read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
    else:
        assert err == _busy(output)
        assert not output.exists()


def test_overwrite_leaves_an_output_partial_that_another_process_is_writing(run, tmp_path, capsys):
    import fcntl

    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    partial = tmp_path / "out.txt.partial"
    partial.write_text("the other command's lines\n", encoding="utf-8")
    with open(partial, "a") as writing:  # locked as a translate writing it holds it (a lock of another open file)
        fcntl.flock(writing, fcntl.LOCK_EX)
        assert main(["translate", str(run), "--input", str(source), "--output", str(output), "--overwrite"]) == 2
    assert capsys.readouterr().err == _busy(output)
    assert partial.read_text(encoding="utf-8") == "the other command's lines\n" and not output.exists()
    assert (
        main(["translate", str(run), "--input", str(source), "--output", str(output), "--overwrite"]) == 0
    )  # it ended
    assert len(output.read_text(encoding="utf-8").splitlines()) == len(SENTENCES) and not partial.exists()


def test_an_output_that_is_a_symbolic_link_is_written_through(run, tmp_path):
    """OUTPUT.partial renamed onto a link replaced the link with a plain file, leaving the file it named
    as it was (attention, plot, align and evaluate outputs write through links)."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (tmp_path / "shared").mkdir()
    target, link = tmp_path / "shared" / "out.txt", tmp_path / "out.txt"
    target.write_text("old translations\n", encoding="utf-8")
    link.symlink_to(target)
    assert main(["translate", str(run), "--input", str(source), "--output", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and len(target.read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt", "out.txt", "shared"]


def test_an_output_in_a_new_folder_is_written_there(run, tmp_path):
    """evaluate --output and align --out make the folder; translate failed after loading the run, with
    the errno message of OUTPUT.partial."""
    source, output = tmp_path / "in.txt", tmp_path / "new" / "folder" / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output)]) == 0
    assert len(output.read_text(encoding="utf-8").splitlines()) == len(SENTENCES)


def test_a_bad_input_path_leaves_no_partial_output(run, tmp_path, capsys):
    output = tmp_path / "out.txt"
    missing = tmp_path / "missing.txt"
    assert main(["translate", str(run), "--input", str(missing), "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: --input {missing}: no such file\n"
    assert list(tmp_path.iterdir()) == []
    assert main(["translate", str(run), "--input", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --input {tmp_path} is a directory; give a text file, one sentence per line\n"
    )


def test_nbest_above_the_beam_names_the_flag_to_change(run, tmp_path, capsys):
    """The run decodes with beam 3: `--nbest 4` alone is one line naming --beam, not DecodeConfig's beam_size."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    translate = ["translate", str(run), "--input", str(source), "--nbest", "4"]
    assert main(translate) == 2
    err = capsys.readouterr().err
    assert err == "error: --nbest 4 needs a beam of at least 4, not the run's decode.beam_size 3: give --beam 4\n"
    assert main([*translate, "--beam", "2"]) == 2
    assert capsys.readouterr().err == "error: --nbest 4 needs a beam of at least 4, not --beam 2: give --beam 4\n"
    assert main([*translate, "--set", "decode.beam_size=2"]) == 2  # the beam --set gave, not the run's 3
    assert capsys.readouterr().err == (
        "error: --nbest 4 needs a beam of at least 4, not --set decode.beam_size=2: give --beam 4\n"
    )
    assert main([*translate, "--beam", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4 * len(SENTENCES)


def test_beam_under_a_set_nbest_is_refused_naming_both(run, tmp_path, capsys):
    """--beam 2 lowered the nbest that --set decode.nbest=3 asked for to 2, printing the 2 best without a word:
    it is refused naming both as typed; --beam still lowers the run's own nbest, and --nbest replaces the --set."""
    source = tmp_path / "in.txt"
    source.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    translate = ["translate", str(run), "--input", str(source), "--beam", "2"]
    assert main([*translate, "--set", "decode.nbest=3"]) == 2
    assert capsys.readouterr().err == (
        "error: --set decode.nbest=3 needs a beam of at least 3, not --beam 2: give --beam 3, or a smaller "
        "decode.nbest\n"
    )
    assert main([*translate, "--set", "decode.nbest=3", "--nbest", "2"]) == 0  # the flag replaces the --set
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main([*translate, "--set", "decode.nbest=2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main([*translate, "--set", "decode.sampling=true", "--set", "decode.nbest=3"]) == 0  # samples: any beam
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_set_decode_nbest_prints_the_k_best_as_nbest_does(run, tmp_path, capsys):
    """--set decode.nbest=2 decoded two hypotheses per line but printed only the best, as plain text."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    translate = ["translate", str(run), "--input", str(source)]
    assert main([*translate, "--nbest", "2"]) == 0
    expected = capsys.readouterr().out
    assert main([*translate, "--set", "decode.nbest=2"]) == 0
    assert capsys.readouterr().out == expected
    assert len(expected.splitlines()) == 2 * len(SENTENCES)


def test_a_beam_too_large_for_a_later_chunk_names_the_flag_and_what_output_partial_keeps(
    run, tmp_path, capsys, monkeypatch
):
    """The refusal of a search too large for the memory names --beam as it does without --output, also when
    it comes after lines were written (it named DecodeConfig.beam_size there)."""
    from tformer.cli import line_input
    from tformer.decoding import pipeline
    from tformer.decoding.memory import SearchTooLargeError

    ready_chunks = line_input.ready_chunks
    monkeypatch.setattr(line_input, "ready_chunks", lambda fd, max_lines: ready_chunks(fd, 4))

    def too_large_for_long_lines(model, config, *, source_length, device, return_attention=False):
        if source_length > 12:  # the memory is faked: nothing large is allocated
            raise SearchTooLargeError(config, source_length=source_length, needed=2**33, allowed=2**32, total=2**33)
        return None

    monkeypatch.setattr(pipeline, "sentences_per_batch", too_large_for_long_lines)
    lines = ["the cat"] * 4 + ["the cat " * 10] + ["the cat"] * 3
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--output", str(output), "--beam", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: decoding one sentence of") and err.count("\n") == 1, err
    assert "with beam 2 (--beam) needs" in err and "use a smaller --beam;" in err, err
    assert "DecodeConfig" not in err, err
    assert f"the translations of the first 4 input lines are in {output}.partial" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail: disk full)")
@pytest.mark.parametrize("to", ["--output", "stdout"])
def test_a_failed_write_names_what_was_being_written(run, tmp_path, to):
    """A full disk said only "error: [Errno 28] No space left on device": not which output. With --output
    the file's last flush at close failed again after the named error, and its unnamed error won."""
    source = tmp_path / "in.txt"
    source.write_text(f"{SENTENCES[0]}\n{SENTENCES[1]}\n", encoding="utf-8")
    command = [sys.executable, "-m", "tformer.cli.main", "translate", str(run), "--input", str(source), "--beam", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:
        argv = [*command, "--output", "/dev/full"] if to == "--output" else command
        result = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, env=environment, text=True, timeout=120)
    where = "/dev/full" if to == "--output" else "standard output"
    assert (result.returncode, result.stderr) == (2, f"error: could not write {where} (No space left on device)\n")


def test_translate_and_evaluate_name_characters_read_as_unknown(run, tmp_path, capsys):
    """A character the run's tokenizer has no piece for (a Chinese one beyond data.character_coverage) became
    <unk> silently; both commands now name it in one warning."""
    source, reference = tmp_path / "in.txt", tmp_path / "ref.txt"
    source.write_text(f"{SENTENCES[0]}\n猫 {SENTENCES[1]}\n", encoding="utf-8")
    reference.write_text("a\nb\n", encoding="utf-8")
    commands = (["translate", "--input", str(source)], ["evaluate", "--src", str(source), "--ref", str(reference)])
    for command, *flags in commands:
        with pytest.warns(UserWarning, match=r"^input line 2 holds characters the tokenizer has no piece for \(猫\)"):
            assert main([command, str(run), *flags, "--beam", "1"]) == 0
    capsys.readouterr()


def test_translate_truncate_reaches_the_translator(run, tmp_path, capsys):
    """--truncate cuts a line longer than the model accepts (max_positions 64 here) instead of stopping the job:
    translate and evaluate hand it to the Translator through decode_options.command_translator, which nothing
    checked, so a helper that dropped it passed every test."""
    source = tmp_path / "in.txt"
    source.write_text(" ".join(SENTENCES * 20) + "\n", encoding="utf-8")
    assert main(["translate", str(run), "--input", str(source), "--beam", "1"]) == 2
    assert "--truncate" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"translated its first 63"):
        assert main(["translate", str(run), "--input", str(source), "--beam", "1", "--truncate"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_output_is_on_the_disk_before_it_replaces_the_one_there(run, tmp_path, monkeypatch):
    """OUTPUT.partial was renamed onto --output unsynced: a crash soon after could leave an empty file in
    place of the translations --overwrite replaced (every other output is fsynced first, `write_atomic`).
    Files are told apart by inode, which a rename keeps."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    output.write_text("translations saved before\n", encoding="utf-8")
    fsync, replace = os.fsync, os.replace
    synced: list[int] = []
    renamed_unsynced: list[str] = []

    def recorded(descriptor: int) -> None:
        synced.append(os.fstat(descriptor).st_ino)
        fsync(descriptor)

    def renamed(source: str | Path, target: str | Path) -> None:
        if Path(target) == output and os.stat(source).st_ino not in synced:
            renamed_unsynced.append(str(source))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded)
    monkeypatch.setattr(os, "replace", renamed)
    assert main(["translate", str(run), "--input", str(source), "--output", str(output), "--overwrite"]) == 0
    assert renamed_unsynced == [] and len(output.read_text(encoding="utf-8").splitlines()) == len(SENTENCES)


def test_evaluate_prints_its_scores_even_when_its_output_cannot_be_written(run, tmp_path, capsys, monkeypatch):
    """A full disk at --output: the scores of the whole test set were lost with the translations (the file was
    written before the scores were printed); now they are printed first, and the error names the file."""
    import errno

    from tformer import atomic_file

    def full_disk(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic_file, "write_atomic", full_disk)
    source, output = tmp_path / "src.txt", tmp_path / "hyp.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    command = ["evaluate", str(run), "--src", str(source), "--ref", str(source), "--output", str(output), "--json"]
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert {"bleu", "chrf"} <= set(json.loads(out)), out
    assert err.startswith("error: ") and str(output) in err and err.count("\n") == 1, err
    assert not output.exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_partial_that_is_a_directory_is_named_with_what_to_do(run, tmp_path, capsys, overwrite):
    """--overwrite failed after loading the run with a bare `[Errno 21] Is a directory`; without it, the line
    said to pass --overwrite, which only led there."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (tmp_path / "out.txt.partial").mkdir()
    assert main(["translate", str(run), "--input", str(source), "--output", str(output), *overwrite]) == 2
    assert capsys.readouterr().err == (
        f"error: --output: {output}.partial is a directory, where {output} is written until complete; move it\n"
    )
    assert (tmp_path / "out.txt.partial").is_dir() and not output.exists()


def test_an_output_name_too_long_for_its_partial_file_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """A name within 8 bytes of the file system's 255 failed as `[Errno 36] File name too long: '...partial'`,
    naming a file the user never gave, without saying what to do."""
    name = "a" * 250
    assert main(["translate", str(tmp_path / "no_run"), "--output", str(tmp_path / name)]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: --output: {name} is written as {name}.partial until it is complete, a name over the 255 bytes a "
        "file system takes; choose a name of at most 247 bytes\n"
    )
    assert list(tmp_path.iterdir()) == []
