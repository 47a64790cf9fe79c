"""The ``displback`` command line: one subcommand per job an admin or developer runs."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

from displback import __version__
from displback.app.checkconfig import add_check_config_parser
from displback.app.logs import LOG_LEVELS, configure_logging
from displback.app.run import add_run_parser
from displback.app.status_socket import add_status_parser
from displback.app.validators import option, positive
from displback.kms.info import add_kms_info_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="displback",
        description="Para-virtual display (displif) backend for Xen Dom0.",
    )
    parser.add_argument("--version", action="version", version=f"displback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the daemon against a simulated Xen with two simulated guests",
        description="Start a simulated Xen machine, the backend and two guests drawing test "
        "patterns; show a live status, write PNG snapshots of every output, check for leaks.",
    )
    number = option(positive, float)
    demo.add_argument("--seconds", type=number, default=10.0, help="how long (10)")
    demo.add_argument("--fps", type=number, default=30.0, help="guest frame rate (30)")
    demo.add_argument(
        "--snapshots", type=Path, default=None, help="directory for the PNGs (a new temp dir)"
    )
    demo.add_argument("--log-level", choices=LOG_LEVELS, default="warning")
    demo.set_defaults(func=_demo)

    add_run_parser(commands)
    add_check_config_parser(commands)
    add_status_parser(commands)
    add_kms_info_parser(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    import trio

    from displback.app.demo import run_demo

    configure_logging(args.log_level)
    return trio.run(
        functools.partial(run_demo, seconds=args.seconds, fps=args.fps, snapshots=args.snapshots)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
