"""The `moat` command. Each subcommand parses its arguments and calls one library function.

To add a subcommand: write `_add_<name>(subparsers)` that creates the parser and sets
`func`, then append it to COMMANDS. Import heavy modules inside the command function so that
`moat --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every variant with parameters and FLOPs")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from moat.summary import models_table

    print(models_table(with_flops=not args.no_flops))
    return 0


def _window_arg(text: str):
    """'none' -> None; '7' -> (7, 7); '7x9' -> (7, 9)."""
    if text.lower() in ("none", "global", "-"):
        return None
    h, _, w = text.lower().partition("x")
    return (int(h), int(w or h))


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-stage shapes, parameters and FLOPs of one variant")
    p.add_argument("name")
    p.add_argument("--img-size", nargs="+", type=int, metavar=("H", "W"), default=None)
    p.add_argument(
        "--window-size", nargs=4, type=_window_arg, default=None, metavar="W",
        help="one entry per stage: none, N or HxW, e.g. --window-size none none 14 none",
    )
    p.add_argument("--no-position-embedding", action="store_true")
    p.add_argument("--pool-size", type=int, default=2)
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from moat.summary import model_summary

    print(model_summary(args.name, img_size=args.img_size, window_size=args.window_size,
                        position_embedding=not args.no_position_embedding,
                        pool_size=args.pool_size))
    return 0


COMMANDS = [_add_models, _add_summary]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # Library errors already say what was wrong and what to do; no traceback for users.
        print(f"moat {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
