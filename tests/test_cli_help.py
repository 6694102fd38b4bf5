"""Every command's --help works, shows its description with the line breaks it was written with, and states
the default of every option that has one."""

from __future__ import annotations

import argparse

import pytest

from tformer.cli.main import COMMANDS, build_parser, main


@pytest.mark.parametrize(("name", "module"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_help_keeps_the_description_lines(name, module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out.splitlines()
    written = [line for line in (module.__doc__ or "").splitlines() if line.strip()]
    assert written, f"{name} should have a description"
    for line in written:
        assert line.rstrip() in shown, f"{name} --help lost the line {line!r}"


def test_every_option_with_a_default_states_it() -> None:
    """An option that takes a value when it is not given says so in its --help ("default: ...")."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            no_value = action.default is None or action.default is False or action.default == []
            if not action.option_strings or no_value or action.default == argparse.SUPPRESS:
                continue
            if "default" not in (action.help or ""):
                silent.append(f"tformer {name} {action.option_strings[-1]} (default {action.default!r})")
    assert not silent, "options whose --help does not state their default: " + ", ".join(silent)


def test_the_set_help_of_serve_names_what_applies_after_it() -> None:
    """translate and evaluate have decoding flags (--beam, --length-penalty, ...) that apply after --set;
    serve has none, and a request's fields are what override its [decode] settings."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {
        name: next(a.help for a in subparsers.choices[name]._actions if "--set" in a.option_strings)
        for name in ("translate", "evaluate", "serve")
    }
    assert helps["translate"].endswith("the other decoding flags apply after it")
    assert helps["evaluate"] == helps["translate"]
    assert helps["serve"].endswith("a request's beam, nbest and max_length apply after it")


def test_attention_help_says_a_negative_head_counts_from_the_end(capsys) -> None:
    """`--head -1` draws the last head, as `--layer -1` the last layer; the help said only "0-based"."""
    with pytest.raises(SystemExit):
        main(["attention", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--head HEAD only this head (0-based; negative counts from the end)" in shown
    assert "--layer LAYER only this layer (0-based; negative counts from the end)" in shown


def test_translate_help_states_the_chunk_size_it_uses(capsys) -> None:
    """The description said chunks of at most 256 lines while the translator reads 1,024 (CHUNK_LINES)."""
    from tformer.decoding.pipeline import CHUNK_LINES

    with pytest.raises(SystemExit):
        main(["translate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"chunks of the lines that are ready (at most {CHUNK_LINES:,})" in shown
    assert f"up to {CHUNK_LINES:,} lines each" in shown


def test_every_device_option_names_the_devices_it_accepts() -> None:
    """translate's --device said only "torch device", though it refuses what is not auto, cpu, cuda or cuda:N
    (mps, say) as every other command does."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    vague = [
        name
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if "--device" in action.option_strings and not all(w in action.help for w in ("auto", "cpu", "cuda:N"))
    ]
    assert vague == []
