"""Training metrics as JSON lines in RUN_DIR/metrics.jsonl: one object per logged step.

Keys (present when measured at that step): step, epoch, wall_s (training seconds, summed over
resumptions), train_loss (label-smoothed) and train_nll, per target token over all the steps since the
previous row, lr (this step's), tokens_per_s (target tokens), grad_norm (this step's, before clipping;
only with train.clip_norm > 0), valid_loss, valid_nll, valid_ppl, bleu, bleu_lowercase, chrf.

Each row is flushed as soon as it is written, so a killed run loses nothing it had logged; a resumed
run first drops the rows past the checkpoint it continues from, so the file reads as one clean run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tformer.atomic_file import write_atomic


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        clean = {key: _json_number(value) for key, value in row.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()

    def rows(self) -> list[dict[str, Any]]:
        """The logged rows; lines that are not a JSON object (blank, cut short by a crash, or damaged
        into bytes that are not even UTF-8) are skipped."""
        return self._read()[0]

    def _read(self) -> tuple[list[dict[str, Any]], int]:
        """The logged rows, and the number of lines skipped that were not blank."""
        if not self.path.exists():
            return [], 0
        rows, skipped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: a line nested too deep
                skipped += bool(line.strip())  # blank, or a line cut short by a crash
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
        return rows, skipped

    def truncate_after(self, step: int) -> int:
        """Keep only rows up to `step` (atomically), e.g. when resuming from the checkpoint at `step`;
        a row whose step is not a number cannot be placed, and is dropped too. Returns the number of lines
        dropped that were not rows of a known step (damaged), for the resumed run to say so."""
        if self.path.is_symlink():  # a received run's: rewriting it, then appending, would change a file elsewhere
            raise ValueError(
                f"{self.path} is a symbolic link (to {os.readlink(self.path)}), where a run keeps its metrics; "
                "replace it with a copy of the file it names, or remove it"
            )
        if not self.path.exists():
            return 0
        if self.path.is_dir():  # reading it would fail with a bare "Is a directory"
            raise ValueError(f"{self.path} is a directory, where a run keeps its metrics; remove or rename it")
        rows, unreadable = self._read()
        placed = [row for row in rows if _is_step(row.get("step", 0))]
        kept = [row for row in placed if row.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode("utf-8"))
        return unreadable + len(rows) - len(placed)


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_number(value: Any) -> Any:
    """NaN and infinities are not JSON; write them as strings that say what they were."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
