"""The `moat` command. Each subcommand parses its arguments and calls one library function.

To add a subcommand: write `_add_<name>(subparsers)` that creates the parser and sets
`func`, in the module of its group (model, train, deploy, explain), and append it to that
module's COMMANDS. Import heavy modules inside the command function so that
`moat --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import sys

from moat.cli import deploy, explain, model, train
from moat.errors import boundary

COMMANDS = model.COMMANDS + train.COMMANDS + deploy.COMMANDS + explain.COMMANDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from moat.allocator import keep_freed_memory

    keep_freed_memory()  # this process is ours: see moat/allocator.py
    resume = None
    if args.command == "train":  # what to do after Ctrl-C / SIGTERM, from the run's state
        given = list(sys.argv[1:] if argv is None else argv)
        resume = functools.partial(train.interrupted_hint, args, given)
    # Expected failures: one or two lines and exit 2; bugs: a traceback (moat/errors.py).
    with boundary(args.command, resume_hint=resume) as outcome:
        outcome.code = args.func(args)
    return outcome.code
