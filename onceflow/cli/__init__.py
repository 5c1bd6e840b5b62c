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

from onceflow.errors import exit_status, interrupts_held
from onceflow.versions import ONCEFLOW_VERSION

# Subcommand modules, in the order `onceflow --help` lists them.
_SUBCOMMAND_MODULES = (
    "onceflow.cli.run",
    "onceflow.cli.lag",
    "onceflow.cli.dlq",
    "onceflow.cli.templates",
)
# The development tools' subcommands (package onceflow_dev): absent from the worker
# package, so each says in one line how to get them when it is not installed.
_DEV_SUBCOMMAND_MODULES = {
    "dev": ("onceflow_dev.devstack.command", "local Kafka, PostgreSQL, Prism and Flink for development"),
    "torture": ("onceflow_dev.torture.command", "faults injected into a live run, the sink compared with the truth"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """A mistake in a command's flags as one line, with where to read about them
    (argparse prints the command's whole usage first). Subcommands' parsers are of
    this class too (argparse makes them of their parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="onceflow",
        description="Operations for onceflow pipelines (jobs, lag, DLQ, templates, dev services, torture).",
    )
    parser.add_argument("--version", action="version", version=f"onceflow {ONCEFLOW_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for name, (module_name, summary) in _DEV_SUBCOMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not (error.name or "").startswith("onceflow_dev"):
                raise
            _register_missing(subparsers, name, summary)
        else:
            module.register(subparsers)
    return parser


def _register_missing(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    """A subcommand of the development tools where they are not installed."""
    parser = subparsers.add_parser(name, help=f"{summary} (not installed here)", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def handler(_args) -> int:
        print(f"onceflow {name}: the development tools (package onceflow_dev) are not installed here; they "
              "come with a source checkout: pip install -e .", file=sys.stderr)
        return 2

    parser.set_defaults(handler=handler)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the innermost subcommand ``args`` chose (``dlq list``'s for
    ``onceflow dlq list ...``)."""
    while True:
        choices = next((action for action in parser._actions if isinstance(action, argparse._SubParsersAction)),
                       None)
        chosen = None if choices is None else getattr(args, choices.dest, None)
        if chosen not in getattr(choices, "choices", {}):
            return parser
        parser = choices.choices[chosen]


def main(argv: Sequence[str] | None = None) -> int:
    try:  # build_parser imports Beam, and parsing a job's flags can: Ctrl-C then is an interrupt, not a traceback
        with interrupts_held():  # raised inside the imports, it could be lost
            parser = build_parser()
            args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        print("onceflow: interrupted", file=sys.stderr)
        return 130
    if unknown:  # with the usage of the subcommand they were given to, not the top level's
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
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
