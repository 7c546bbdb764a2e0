"""Subcommands of the ``fastattn`` command line, one module each.

Each module defines ``HELP`` (one line), ``configure(parser)`` (adds its arguments to an
argparse parser) and ``run(args) -> int`` (the exit code).
"""

COMMANDS = ("train", "translate", "bench", "profile", "info", "tune")
