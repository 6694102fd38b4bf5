"""The built-in main job, shortened: the same pipeline end to end in seconds (the full demo is not a test)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tformer.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def test_quick_demo_trains_evaluates_and_saves_a_usable_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = tmp_path / "demo"
    code, printed = run_cli("demo", "--quick", "--quiet", "--out", str(run_dir))
    assert code == 0
    match = re.search(r"exact match: (\d+\.\d+)%\s+chrF: (\d+\.\d+)", printed)
    assert match, printed
    assert 0.0 <= float(match.group(1)) <= 100.0 and 0.0 <= float(match.group(2)) <= 100.0
    assert "held-out numbers: 100" in printed
    assert (run_dir / "cross_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for split in ("train", "valid", "test"):
        assert (run_dir / "data" / f"{split}.en").exists() and (run_dir / "data" / f"{split}.de").exists()

    monkeypatch.setattr("sys.stdin", io.StringIO("three hundred forty-two\n"))
    code, translated = run_cli("translate", str(run_dir), "--beam", "1")
    assert code == 0 and len(translated.splitlines()) == 1

    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(run_dir)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
