"""The Python block of docs/training.md's "From Python" runs as written (on a small corpus made here, with
a tenth of its steps): a reader who copies it into a notebook gets a run, trained further by a resume,
and a translation."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from training_helpers import write_corpus

from tformer.training import load_run

REPO = Path(__file__).resolve().parents[1]


def from_python_block() -> str:
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


@pytest.mark.usefixtures("one_thread")
def test_the_from_python_block_trains_and_translates(tmp_path: Path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path)
    for name in ("train", "valid"):
        for side, language in (("src", "en"), ("tgt", "de")):
            os.replace(corpus[f"{name}_{side}"], tmp_path / f"{name}.{language}")
    block = from_python_block()
    for steps in (300, 400):
        assert f'"train.max_steps={steps}"' in block
        block = block.replace(f'"train.max_steps={steps}"', f'"train.max_steps={steps // 10}"')
    printed = io.StringIO()
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "docs/training.md", "exec"), {})
    translations = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
    assert isinstance(translations, list) and len(translations) == 1 and isinstance(translations[0], str)
    assert load_run(tmp_path / "runs" / "mine", which="last").step == 40  # trained, then resumed
