"""`python -m tformer ...` runs the `tformer` command, also where the console script is not on PATH."""

from tformer.cli.entry import program

program()
