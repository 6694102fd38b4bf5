"""The Transformer stands alone: `tformer.model` imports only torch, `tformer.config` and the standard
library, never training, data, decoding or anything built on them (the promise of model/__init__.py and
docs/architecture.md, and what keeps the model usable without them). Checked in every file's import
statements, those inside functions too, and in what importing the package really loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import tformer

PACKAGE = Path(tformer.__file__).parent
ALLOWED_OWN = ("tformer.model", "tformer.config")
CONFIG_LEAVES = ("tformer.recipes",)  # the config's lookup of shipped recipes: imports no tformer module
ALLOWED_THIRD_PARTY = ("torch",)


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Every module an import statement of the file names, wherever the statement is (`root`: the directory
    that holds the `tformer` package, against which relative imports are resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package of the file
                base = ".".join(path.relative_to(root).with_suffix("").parts[: -node.level])
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


def allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "tformer":
        return any(module == own or module.startswith(own + ".") for own in ALLOWED_OWN)
    return top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names


def test_model_files_import_only_torch_config_and_the_standard_library() -> None:
    files = sorted((PACKAGE / "model").glob("*.py"))
    assert len(files) >= 10
    found = {f"{path.name}: {module}" for path in files for module in imported_modules(path) if not allowed(module)}
    assert not found, f"model/ imports what it must not: {sorted(found)}"


def test_config_files_import_nothing_of_tformer_but_config() -> None:
    """The model may import the config, so the config must not bring the rest in behind it."""
    found = {
        f"{path.name}: {module}"
        for path in sorted((PACKAGE / "config").glob("*.py"))
        for module in imported_modules(path)
        if module.startswith("tformer") and not module.startswith(("tformer.config", *CONFIG_LEAVES))
    }
    assert not found, sorted(found)
    for leaf in CONFIG_LEAVES:
        path = PACKAGE / f"{leaf.removeprefix('tformer.')}.py"
        assert not [module for module in imported_modules(path) if module.startswith("tformer")], leaf


def test_importing_the_model_loads_no_other_part_of_tformer() -> None:
    code = (
        "import json, sys; import tformer.model; from tformer.model import Transformer; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('tformer'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    outside = [m for m in loaded if m != "tformer" and not m.startswith((*ALLOWED_OWN, *CONFIG_LEAVES))]
    assert not outside, outside
    assert "tformer.model.transformer" in loaded


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    probe = tmp_path / "tformer" / "model" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import math\nfrom . import masks\n\n\ndef f():\n    from tformer.decoding import generate\n"
        "    from ..training import loss\n    import numpy\n"
    )
    names = imported_modules(probe, root=tmp_path)
    assert names == ["math", "tformer.model", "tformer.decoding", "tformer.training", "numpy"]
    assert [allowed(name) for name in names] == [True, True, False, False, False]
