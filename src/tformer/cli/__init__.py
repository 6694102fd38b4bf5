"""The `tformer` command line: one module per subcommand, each with `add_arguments` and `run`.

A command module imports at its top only what its parser needs (argparse, tformer.config, small modules of
constants); torch and everything that imports it are imported inside `run`, so that `tformer --help`,
`tformer COMMAND --help` and an argument error answer without loading them (tests/test_cli_startup.py).
"""
