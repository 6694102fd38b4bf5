"""The decoding commands name a setting as it was typed, as `tformer train` does: the flag (--length-penalty
nan) for a plain flag, the key (decode.length_penalty=nan) for a --set; the flags come after --set."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from test_decoding_memory import fake_memory
from test_export_hf import SENTENCES, make_run

from tformer.cli.main import main

HUGE = str(10**22)  # over 64 bits


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("decode_flags") / "run")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    return path


def _fails_with(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n", err


def _commands(run: Path, source: Path) -> dict[str, list[str]]:
    return {
        "translate": ["translate", str(run), "--input", str(source)],
        "evaluate": ["evaluate", str(run), "--src", str(source), "--ref", str(source)],
    }


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_a_flag_is_named_as_typed_and_a_set_key_as_its_key(
    run: Path, source: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """translate --length-penalty nan said 'decode.length_penalty must be a finite number', a key the user
    never typed (so did --beam and --nbest over 64 bits)."""
    argv = _commands(run, source)[command]
    _fails_with(capsys, [*argv, "--length-penalty", "nan"], "--length-penalty must be a finite number, got nan")
    _fails_with(capsys, [*argv, "--length-penalty", "1e400"], "--length-penalty must be a finite number, got inf")
    _fails_with(
        capsys, [*argv, "--set", "decode.length_penalty=nan"], "decode.length_penalty must be a finite number, got nan"
    )
    big = f"must be a 64-bit integer (below 2**63 in size), got {HUGE}"
    _fails_with(capsys, [*argv, "--beam", HUGE], f"--beam {big}")
    _fails_with(capsys, [*argv, "--set", f"decode.beam_size={HUGE}"], f"decode.beam_size {big}")


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_a_sampling_setting_for_a_search_is_named_in_one_warning(run: Path, source: Path, command: str) -> None:
    """`--set decode.top_k=10` without decode.sampling=true decoded with beam search as if it had not been
    given, saying nothing. (The command line prints a warning as one `warning: ...` line.)"""
    argv = _commands(run, source)[command]
    with pytest.warns(UserWarning) as caught:
        assert main([*argv, "--set", "decode.top_k=10", "--set", "decode.seed=3"]) == 0
    assert [str(w.message) for w in caught if "sampling" in str(w.message)] == [
        "--set decode.top_k and --set decode.seed are sampling settings, which beam search (beam 3) ignores: "
        "add --set decode.sampling=true to sample"
    ]
    with pytest.warns(UserWarning, match=r"^--set decode.temperature is a sampling setting, which greedy search"):
        assert main([*argv, "--beam", "1", "--set", "decode.temperature=0.5"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--set", "decode.top_k=10", "--set", "decode.sampling=true"]) == 0
    assert not [w for w in caught if "sampling setting" in str(w.message)]


def test_translate_nbest_and_attention_beam_are_named_as_typed(
    run: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = f"must be a 64-bit integer (below 2**63 in size), got {HUGE}"
    sampling = ["--set", "decode.sampling=true"]
    _fails_with(capsys, [*_commands(run, source)["translate"], *sampling, "--nbest", HUGE], f"--nbest {big}")
    attention = ["attention", str(run), SENTENCES[0], "--out", str(tmp_path / "a.png"), "--beam", HUGE]
    _fails_with(capsys, attention, f"--beam {big}")


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_a_beam_too_large_for_the_memory_is_named_as_typed(
    run: Path, source: Path, command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--set decode.beam_size=500000 was refused as 'beam 500000 (--beam) ...: use a smaller --beam', naming a
    flag the user never typed; the flag, given after the --set, is the one named."""
    fake_memory(monkeypatch, 2**30)
    argv = _commands(run, source)[command]
    too_large = (
        r"error: decoding one sentence of \d+ tokens with beam 5000\d\d \({0}\) needs about .* use a smaller {0}\n"
    )
    assert main([*argv, "--set", "decode.beam_size=500000"]) == 2
    assert re.fullmatch(too_large.format("--set decode.beam_size"), capsys.readouterr().err)
    assert main([*argv, "--set", "decode.beam_size=500000", "--beam", "500001"]) == 2
    assert re.fullmatch(too_large.format("--beam"), capsys.readouterr().err)


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_a_set_value_that_a_flag_replaces_is_never_checked(
    run: Path, source: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set decode.length_penalty=nan --length-penalty 1 failed on the --set's nan, which the flag replaces:
    the --set was checked before the flags were applied. The merged settings are checked once."""
    argv = _commands(run, source)[command]
    assert main([*argv, "--set", "decode.length_penalty=nan", "--length-penalty", "1"]) == 0
    assert main([*argv, "--set", "decode.beam_size=0", "--beam", "2"]) == 0
    capsys.readouterr()
    _fails_with(
        capsys,
        [*argv, "--set", "decode.length_penalty=1", "--length-penalty", "nan"],
        "--length-penalty must be a finite number, got nan",
    )


def test_translate_checks_nbest_against_the_beam_that_replaces_the_set_one(
    run: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set decode.beam_size=2 --set decode.nbest=3 --beam 3 was refused for the beam of 2 that --beam replaces."""
    argv = _commands(run, source)["translate"]
    assert main([*argv, "--set", "decode.beam_size=2", "--set", "decode.nbest=3", "--beam", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    _fails_with(
        capsys,
        [*argv, "--set", "decode.beam_size=2", "--set", "decode.nbest=3"],
        "--set decode.nbest=3 needs a beam of at least 3, not --set decode.beam_size=2: give --beam 3, or a smaller "
        "decode.nbest",
    )


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_the_advice_names_the_flag_that_sets_the_key(
    run: Path, source: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set decode.compile_step=true alone was advised to `set static_step = true`, which is neither a flag
    nor a --set: the command's --static-step is named."""
    argv = [*_commands(run, source)[command], "--set", "decode.compile_step=true"]
    _fails_with(capsys, argv, "decode.compile_step compiles the static step: give --static-step as well")
