"""`python -m tformer ...` runs the `tformer` command, also where the console script is not on PATH."""

import sys

try:
    from tformer.cli.main import program
except KeyboardInterrupt:  # Ctrl-C in the tenth of a second the command's modules take to load: no traceback
    print("interrupted", file=sys.stderr)
    exec("pass", {})  # the interrupt left a string exec: see tformer.cli.main._forget_caught_interrupt
    sys.exit(130)

program()
