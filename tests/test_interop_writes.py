"""`tformer export` and `import-hf` write their output whole or not at all: interrupted (Ctrl-C, SIGTERM) or
failing half-way (a full disk), they leave neither a half-filled --out nor their staging directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_hf import make_run

from tformer.cli.main import main

pytest.importorskip("transformers")

# Runs a command whose output is held up half-written: the hooked function says "writing" on stdout and
# waits for the signal the test sends then.
HELD_WRITE = """
import sys, time
import {module} as hooked
original = hooked.{owner}{name}

def held(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(120)
    return original(*args, **kwargs)

setattr(hooked{owner_attr}, "{name}", held)
from tformer.cli.main import program
program(sys.argv[1:])
"""

HOOKS = {  # command -> (module, class or "", function) held while the staging directory is half-filled
    "hf": ("tformer.interop.marian_tokenizer", "VocabTokenizer", "write_marian_files"),
    "ctranslate2": ("ctranslate2.converters", "TransformersConverter", "convert"),
    "import-hf": ("tformer.interop.hf_import", "", "write_pointer"),
}


def held_write_script(command: str) -> str:
    module, owner, name = HOOKS[command]
    return HELD_WRITE.format(
        module=module, owner=f"{owner}." if owner else "", owner_attr=f".{owner}" if owner else "", name=name
    )


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("command", ["hf", "ctranslate2", "import-hf"])
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_export_or_import_leaves_nothing_behind(tmp_path, command, signal_number):
    """SIGTERM (kill, timeout, a scheduler) ended export and import-hf at once: the staging directory
    (.tmp-OUT-PID beside --out, and CTranslate2's Hugging Face copy in the temporary folder) stayed."""
    if command == "ctranslate2":
        pytest.importorskip("ctranslate2")
    run = make_run(tmp_path / "run")
    if command == "import-hf":
        assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
        arguments = ["import-hf", str(tmp_path / "hf")]
    else:
        arguments = ["export", str(run), "--to", command]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    before = entries(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", held_write_script(command), *arguments, "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    try:
        assert process.stdout.readline() == "writing\n"
        process.send_signal(signal_number)
        _, error = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, error
    assert error.splitlines()[-1] == "interrupted"
    assert entries(tmp_path) == before
    assert [name for name in entries(temporary) if name.startswith("tmp")] == []  # tempfile's (not torch's cache)
