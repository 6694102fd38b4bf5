"""Warnings that name the user's line: the first caller outside tformer.

A hard-coded `stacklevel` counts the calls between the warning and the user, and points at a line of tformer
once they change (a helper split out, a closure that reads again where a run changed meanwhile)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).parent)


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` at the first frame outside tformer's own files."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of warn_caller
    while frame is not None and _in_package(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _in_package(filename: str) -> bool:
    return filename.startswith(PACKAGE_DIR + "/") or filename.startswith(PACKAGE_DIR + "\\")
