"""Every command's --help works and shows its description with the line breaks it was written with."""

from __future__ import annotations

import pytest

from tformer.cli.main import COMMANDS, main


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
