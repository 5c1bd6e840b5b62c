"""Errors that reach a user as one line, never as a traceback."""

import sys
from typing import Callable


class UsageError(Exception):
    """A flag, config value or file given by the user is wrong.

    The message names what is wrong and how to fix it; entry points print it as a
    single line and exit with status 2.
    """


class ServiceError(Exception):
    """A service the command needs (a broker, a database, a runner) is missing,
    unreachable or failed to start. The message says what to do; exit status 1."""


def exit_status(prog: str, action: Callable[[], int]) -> int:
    """Runs an entry point's ``action`` and turns the errors above into one line on
    stderr and an exit status: 2 for a usage error, 1 for a service error, 130 when
    interrupted before the action handled it."""
    try:
        return int(action() or 0)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except ServiceError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_interruption(error):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def is_interruption(error: BaseException) -> bool:
    """Whether ``error`` is Ctrl-C as a runner passes it on: Beam's DirectRunner
    re-raises an interrupt in a step as ``RuntimeError: KeyboardInterrupt [while
    running 'STEP']``, raised from it or with it as text. Only the chain of
    ``raise ... from``: an error raised while an interrupt was being handled (a
    failed savepoint stop, say) is that error, not the interrupt; so is one of
    onceflow's own one-line errors."""
    seen = set()
    while error is not None and id(error) not in seen and not isinstance(error, (UsageError, ServiceError)):
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt) or str(error).startswith("KeyboardInterrupt"):
            return True
        error = error.__cause__
    return False
