"""Commands that need an optional extra: a missing library is one line that says what to install.

fastapi and uvicorn (`serve`), transformers (`export`, `import-hf`) and ctranslate2 (`export --to
ctranslate2`) are not installed with tformer itself; without this check the command stopped with a
ModuleNotFoundError traceback, some of them after loading the model or creating the output directory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


class MissingExtraError(ValueError):
    """A library the command needs is not installed; the message gives the pip command."""


def require(modules: Sequence[str], *, command: str, extra: str) -> None:
    """Raise MissingExtraError naming `pip install 'tformer[extra]'` unless every module is importable."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"`tformer {command}` needs {' and '.join(missing)}, which tformer does not install by itself:"
            f" pip install 'tformer[{extra}]'"
        )
