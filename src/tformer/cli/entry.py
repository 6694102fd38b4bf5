"""Where the `tformer` command starts, as the console script and as `python -m tformer`: it loads the command
line (a tenth of a second of imports), taking a Ctrl-C that comes meanwhile as every later one is taken: the
line "interrupted" and status 130, not a KeyboardInterrupt traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


def program() -> NoReturn:
    try:
        from tformer.cli.main import program as run_command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exec("pass", {})  # the interrupt left a string exec: see tformer.cli.main._forget_caught_interrupt
        sys.exit(130)
    run_command()
