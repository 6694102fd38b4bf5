"""`tformer --help`, `tformer COMMAND --help` and a mistyped flag answer at once: building and using the
argument parser imports no heavy library, since each command imports what it runs with inside `run`.
Importing torch alone takes about a second, which every `--help` and every argument error paid before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tformer

HEAVY = (
    "torch",
    "numpy",
    "safetensors",
    "sentencepiece",
    "sacrebleu",
    "matplotlib",
    "transformers",
    "ctranslate2",
    "fastapi",
    "uvicorn",
)

# a fresh interpreter: what this test process has imported already says nothing
PARSE_ONLY = """
import contextlib, io, json, sys
from tformer.cli.main import COMMANDS, build_parser

parser = build_parser()
helps = [["--help"], *([name, "--help"] for name, _ in COMMANDS)]
mistakes = [[name, "--no-such-flag"] for name, _ in COMMANDS]
typed = [  # the type functions of the flags run too, on good values and on bad ones
    ["demo", "--seed", "7", "--train-steps", "5", "--train-seconds", "1.5"],
    ["demo", "--seed", "-1"],
    ["explain", "--seed", "99999999999999999999"],
    ["translate", "RUN", "--beam", "x"],
    ["translate", "RUN", "--which", "middle", "--ensemble", "A", "B", "--length-penalty", "0.6"],
    ["evaluate", "RUN", "--src", "s", "--ref", "r", "--tokenize", "zh", "--static-step"],
    ["attention", "RUN", "text", "--out", "a.png", "--kind", "cross"],
    ["train", "--out", "RUN", "--preset", "tiny", "--max-time", "60", "--compile"],
    ["info", "--preset", "huge"],
    ["download", "multi30k", "--out", "data"],
    ["serve", "RUN", "--port", "0"],
]
for argv in [*helps, *mistakes, *typed]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
print(json.dumps(sorted(sys.modules)))
"""


def test_parsing_every_command_imports_no_heavy_library() -> None:
    source = str(Path(tformer.__file__).resolve().parents[1])  # the tformer this test imports
    code = f"import sys; sys.path.insert(0, {source!r})\n" + PARSE_ONLY
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout))
    assert "tformer.cli.train" in imported  # the commands' modules were loaded, and their parsers used
    heavy = [name for name in HEAVY if name in imported]
    assert not heavy, f"building and using the parser imported {', '.join(heavy)}"


def test_download_and_tformer_data_import_no_heavy_library() -> None:
    """`tformer download` imports tformer.data.download, so tformer/data/__init__.py first: its eager
    re-exports imported torch and sentencepiece (~2 s of a 2.5 s failed download) for a command that
    fetches files with the standard library. The package now re-exports nothing."""
    source = str(Path(tformer.__file__).resolve().parents[1])
    code = (
        f"import json, sys; sys.path.insert(0, {source!r})\n"
        "import tformer.data, tformer.data.download\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    heavy = [name for name in HEAVY if name in json.loads(done.stdout)]
    assert not heavy, f"importing tformer.data.download imported {', '.join(heavy)}"
