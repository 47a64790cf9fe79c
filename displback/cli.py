"""The ``displback`` command line: one subcommand per job an admin or developer runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from displback import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="displback",
        description="Para-virtual display (displif) backend for Xen Dom0.",
    )
    parser.add_argument("--version", action="version", version=f"displback {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
