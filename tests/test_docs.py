"""What README.md and docs/*.md name exists: the tests, files and benchmark records they cite, the flags of
the commands they show, the config keys they name, and the list of commands. Prose is not checked, only
names a reader would type or look up; and that the shape legend of each source file covers the letters of
its names' shape suffixes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from tformer.cli.main import COMMANDS, build_parser
from tformer.config.experiment import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `section.key` spans in the docs that are not config keys: a file name, and keys the docs show as refused
# (an unknown one, and a misspelt one with the suggestion the error gives).
NOT_CONFIG_KEYS = {"model.safetensors", "model.nonsense", "train.max_step"}


def lines_of_docs():
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"{path.relative_to(REPO)}:{number}", line


def command_flags() -> dict[str, set[str]]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in sub._actions for o in a.option_strings} for name, sub in subparsers.choices.items()}


def test_every_test_the_docs_cite_exists() -> None:
    missing = []
    for where, line in lines_of_docs():
        for file, name in re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", line):
            path = REPO / "tests" / file
            if not path.is_file():
                missing.append(f"{where}: tests/{file}")
            elif name and not re.search(rf"^\s*(?:async )?def {name}\(|^class {name}\b", path.read_text(), re.M):
                missing.append(f"{where}: tests/{file}::{name}")
    assert missing == []


def test_every_path_the_docs_name_exists() -> None:
    """Paths under src/, tests/, benchmarks/ and docs/ (a `*` in one must match a file)."""
    missing = []
    for where, line in lines_of_docs():
        for path in re.findall(r"(?<![\w/.])((?:src|tests|benchmarks|docs)/[\w./*{},-]*[\w*])", line):
            if "{" in path:  # decode_cpu_{small,base}_batch1_...: each alternative
                head, alternatives, tail = re.match(r"(.*)\{(.*)\}(.*)", path).groups()
                paths = [head + alternative + tail for alternative in alternatives.split(",")]
            else:
                paths = [path]
            for one in paths:
                if not (any(REPO.glob(one)) if "*" in one else (REPO / one).exists()):
                    missing.append(f"{where}: {one}")
    assert missing == []


def source_file(path: str) -> Path | None:
    """A `.py` path as the docs write it: from the repository, from src/ (`tformer/model/cache.py`), from the
    package (`model/cache.py`, `explain.py`), or a file name found once in the package (`greedy.py`)."""
    for candidate in (REPO / path, REPO / "src" / path, REPO / "src" / "tformer" / path):
        if candidate.is_file():
            return candidate
    found = list((REPO / "src" / "tformer").rglob(path))
    return found[0] if len(found) == 1 else None


def test_every_python_file_the_docs_name_exists() -> None:
    """`model/embeddings.py` and the like, named from the package as the architecture table names them."""
    missing = []
    for where, line in lines_of_docs():
        for path in re.findall(r"`([\w/.]+\.py)`", line):
            if source_file(path) is None:
                missing.append(f"{where}: {path}")
    assert missing == []


def test_every_name_the_docs_give_after_a_file_is_defined_there() -> None:
    """`model/embeddings.py` `TokenEmbedding`, `SinusoidalPositions`: each name right after a file (and after
    the names that follow it) is a function, class or constant of that file, `Class.method` a method of it,
    so that a name moved by a refactoring is not left pointing at its old file."""
    undefined = []
    for where, line in lines_of_docs():
        for chain in re.findall(r"`[\w/.]+\.py`(?:(?:\s+|,\s*|\s+and\s+)`[^`]+`)+", line):
            text = None
            for span in re.findall(r"`([^`]+)`", chain):
                if span.endswith(".py"):
                    path = source_file(span)
                    text = None if path is None else path.read_text(encoding="utf-8")
                    continue
                name = re.fullmatch(r"([A-Za-z_]\w*)(?:\.(\w+))?(?:\(.*\))?", span)
                if text is None or name is None:
                    continue
                top, attribute = name.groups()
                found = re.search(rf"^\s*(?:async )?(?:def|class) {top}\b|^{top}\b.*=", text, re.M)
                if found and attribute:
                    found = re.search(rf"^\s+(?:async )?def {attribute}\b|^\s+{attribute}\s*[:=]", text, re.M)
                if not found:
                    undefined.append(f"{where}: {span} in {path.relative_to(REPO)}")
    assert undefined == []


def test_every_flag_shown_for_a_command_exists() -> None:
    """`tformer COMMAND ... --flag` in the docs, also on the continuation lines of a command shown over
    several lines (after a trailing backslash, or a usage line's indented `[--flag ...]` lines)."""
    flags = command_flags()
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    command = re.compile(rf"tformer(?:\.cli\.main)?\s+({names})(?![\w-])([^|;#`\n]*)")
    unknown, current = [], None
    for where, line in lines_of_docs():
        match = command.search(line)
        if match:
            current, shown = match.group(1), match.group(2)
        elif current and re.match(r"\s+\[?--", line):
            shown = line
        else:
            current = None
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", shown.split("#")[0]):
            if flag not in flags[current]:
                unknown.append(f"{where}: tformer {current} {flag}")
    assert unknown == []


def usage_blocks() -> list[tuple[str, str, str]]:
    """(where, command, text) of each usage line the docs show as `    tformer COMMAND RUN_DIR [--flag ...]`,
    with its indented `[--flag ...]` continuation lines."""
    blocks = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            match = re.match(r"    tformer ([a-z-]+) [A-Z_]+ (\[.*)", line)
            if match:
                text, following = match.group(2), number + 1
                while following < len(lines) and re.match(r"\s+\[--", lines[following]):
                    text += " " + lines[following].strip()
                    following += 1
                blocks.append((f"{path.relative_to(REPO)}:{number + 1}", match.group(1), text))
    return blocks


def same_value(default: object, shown: str) -> bool:
    """`5` shows a default of 5.0, `cpu` one of "cpu"."""
    try:
        return float(shown) == float(default)
    except (TypeError, ValueError):
        return str(default) == shown


def test_a_usage_line_lists_every_flag_of_its_command_with_its_default() -> None:
    """A reader takes a usage line for the whole list of options: every flag but --help is in it, and a value
    shown as a literal (`[--port 8000]`, not `[--beam N]`) is the flag's default."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert usage_blocks()
    wrong = []
    for where, command, text in usage_blocks():
        actions = {o: a for a in subparsers.choices[command]._actions for o in a.option_strings}
        shown = dict(re.findall(r"(--[a-z][\w-]*)(?: ([^\s\]\[]+))?", text))
        for flag in sorted({a.option_strings[-1] for a in actions.values()} - set(shown) - {"--help"}):
            wrong.append(f"{where}: tformer {command} lacks {flag}")
        for flag, value in shown.items():
            literal = value and not re.search(r"[A-Z|.]{2}|^[A-Z]+$|\|", value) and "KEY" not in value
            if flag in actions and literal and not same_value(actions[flag].default, value):
                wrong.append(f"{where}: tformer {command} {flag} {value}, but its default is {actions[flag].default}")
    assert wrong == []


def test_every_config_key_the_docs_name_exists() -> None:
    """`model.KEY`, `data.KEY`, `train.KEY` and `decode.KEY` inside backticks."""
    config = ExperimentConfig()
    sections = ("model", "data", "train", "decode")
    keys = {section: {field.name for field in dataclasses.fields(getattr(config, section))} for section in sections}
    unknown = []
    for where, line in lines_of_docs():
        for span in re.findall(r"`([^`]+)`", line):
            for section, key in re.findall(r"(?<![\w./-])(model|data|train|decode)\.([a-z_]+)(?![\w(.])", span):
                if key not in keys[section] and f"{section}.{key}" not in NOT_CONFIG_KEYS:
                    unknown.append(f"{where}: {section}.{key}")
    assert unknown == []


def test_every_python_name_the_docs_give_exists() -> None:
    """`tformer.x.y` and `tformer.x.y.Name`: a module, then attributes (a module whose optional extra is
    not installed is skipped)."""
    missing = []
    for where, line in lines_of_docs():
        for name in re.findall(r"\btformer(?:\.[A-Za-z_]\w*)+", line):
            parts, found = name.split("."), None
            for split in range(len(parts), 0, -1):
                try:
                    found = importlib.import_module(".".join(parts[:split]))
                    break
                except ModuleNotFoundError as error:
                    if not (error.name or "").startswith("tformer"):  # an extra that is not installed
                        break
            if found is None:
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute, None)
            if found is None:
                missing.append(f"{where}: {name}")
    assert missing == []


def test_the_readme_lists_every_command() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"lists every command: `([^`]+)`", readme.replace("\n", " "))
    assert listed and listed.group(1).split() == [name for name, _ in COMMANDS]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_links_between_the_docs_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    broken = [link for link in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in link]
    assert [link for link in broken if not (path.parent / link).exists()] == []


SHAPE_SUFFIX = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z0-9][A-Za-z0-9]*)\b")  # q_BHTK, context_R1m
LEGEND = re.compile(r"Shape legend[^:]*:(.*?)(?:\n\n|\"\"\")", re.S)


def legend_letters(legend: str) -> set[str]:
    """The letters a legend defines: `B batch`, `R = B x N rows`, `(n x T queries`."""
    return set(re.findall(r"(?<![\w.^-])([A-Za-z])(?=,? (?:[a-z(=]|x ))", legend))


def test_every_shape_letter_a_file_uses_is_in_its_legend() -> None:
    """A name's shape suffix (`q_BHTK`) is read with the legend at the top of its file (docs/architecture.md):
    every letter a file's suffixes use is in its legend, and every file of the model and of decoding that
    uses shape suffixes has one."""
    missing = []
    for path in sorted((REPO / "src" / "tformer").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        used = {letter for suffix in SHAPE_SUFFIX.findall(text) for letter in suffix if letter.isalpha()}
        legend = LEGEND.search(text)
        where = path.relative_to(REPO)
        if legend is None:
            if used and path.parent.name in ("model", "decoding"):
                missing.append(f"{where}: no shape legend for {''.join(sorted(used))}")
        elif used - legend_letters(legend.group(1)):
            missing.append(f"{where}: {''.join(sorted(used - legend_letters(legend.group(1))))} not in its legend")
    assert missing == []
