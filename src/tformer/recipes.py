"""The experiment recipes that ship with tformer (the TOML files in tformer/configs/), found by name.

They are installed with the package, so `--config multi30k_en_de` works wherever tformer is installed,
not only in a source checkout. The form the docs used before, `--config configs/multi30k_en_de.toml`,
names the same recipe when no such file exists where the command runs; an existing file always wins.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.toml"))


def recipe_path(text: str | Path) -> Path | None:
    """The shipped recipe that `text` names (NAME, NAME.toml or configs/NAME.toml), or None."""
    path = Path(text)
    if path.parent not in (Path("."), Path("configs")) or path.suffix not in ("", ".toml"):
        return None
    candidate = RECIPES_DIR / f"{path.stem}.toml"
    return candidate if candidate.is_file() else None
