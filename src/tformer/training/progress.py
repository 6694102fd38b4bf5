"""What the user sees while training: a tqdm bar on a terminal, plain log lines otherwise.

The bar shows step, loss, lr and tokens/s, with tqdm's ETA when `max_steps` bounds the run. When
stderr is not a terminal (a log file, CI) the same numbers are printed as one line per logged step.
`quiet` silences both, and every message but a warning (a line starting "warning: "), which the main
process still prints. Values reach the bar only at logging steps, which already wait for the device.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

WARNING = "warning: "  # how a line that --quiet still shows starts


def shown(text: str, *, quiet: bool, main_process: bool) -> bool:
    """Whether a message line goes to stderr: from the main process only (the others would repeat it),
    and under --quiet only if it is a warning."""
    return main_process and (not quiet or text.startswith(WARNING))


class Progress:
    def __init__(self, *, total_steps: int | None, initial_step: int, quiet: bool, main_process: bool = True) -> None:
        self.quiet = quiet
        self.main_process = main_process
        self.bar: tqdm | None = None
        if not quiet and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, row: dict[str, Any]) -> None:
        """Show a logged row: as the bar's postfix, or as a line when there is no bar."""
        if self.quiet:
            return
        fields = {
            "loss": _format(row.get("train_loss"), ".3f"),
            "lr": _format(row.get("lr"), ".2e"),
            "tok/s": _format(row.get("tokens_per_s"), ",.0f"),
        }
        fields = {key: value for key, value in fields.items() if value is not None}
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
        else:
            text = " | ".join(f"{key} {value}" for key, value in fields.items())
            print(f"step {row['step']} | {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not shown(text, quiet=self.quiet, main_process=self.main_process):
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _format(value: Any, spec: str) -> str | None:
    return None if value is None else format(value, spec)
