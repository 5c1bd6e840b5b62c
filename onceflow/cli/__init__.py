"""The ``onceflow`` console script: operations around the pipelines.

Each subcommand lives in its own module and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` to a function taking the parsed
arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from onceflow.errors import exit_status
from onceflow.versions import ONCEFLOW_VERSION

# Subcommand modules, in the order `onceflow --help` lists them.
_SUBCOMMAND_MODULES = (
    "onceflow.devstack.command",
    "onceflow.observability.command",
    "onceflow.deadletter_command",
    "onceflow.cli.run",
    "onceflow.cli.templates",
    "onceflow.torture.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onceflow",
        description="Operations for onceflow pipelines (dev services, lag, DLQ, checks).",
    )
    parser.add_argument("--version", action="version", version=f"onceflow {ONCEFLOW_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return exit_status("onceflow", lambda: args.handler(args))
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        sys.stderr.close()  # nothing more to say, and Python must not complain at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
