"""`python -m tformer ...` runs the `tformer` command, also where the console script is not on PATH."""

import sys

from tformer.cli.main import main

sys.exit(main())
