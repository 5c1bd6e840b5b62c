"""Errors that reach a user as one line, never as a traceback."""

import contextlib
import signal
import sys
from typing import Callable, Iterator


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
    interrupted before the action handled it (a Ctrl-C held by
    :func:`hold_interrupts` included)."""
    try:
        release_held_interrupt()
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


_held_interrupts = 0  # Ctrl-Cs held since hold_interrupts()


def _hold_interrupt(signum, frame) -> None:
    global _held_interrupts
    _held_interrupts += 1
    if _held_interrupts > 1:  # a second Ctrl-C: the user means it now
        raise KeyboardInterrupt


def hold_interrupts() -> None:
    """Holds Ctrl-C until :func:`release_held_interrupt` (a second one interrupts at
    once). For a command's start-up: an interrupt raised while Beam's modules were
    imported could land in one of importlib's weakref callbacks, where Python
    prints "Exception ignored" and goes on, and the job then ran to its end. Only
    where Python's own handler is in place: not where SIGINT is ignored, nor over
    a program's own handler."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _hold_interrupt)


def release_held_interrupt() -> None:
    """Puts Python's Ctrl-C handler back after :func:`hold_interrupts`, and raises
    the interrupt it held, if any."""
    if _stop_holding():
        raise KeyboardInterrupt


def _stop_holding() -> int:
    """Puts Python's Ctrl-C handler back; the number of interrupts held."""
    global _held_interrupts
    if signal.getsignal(signal.SIGINT) is _hold_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    held, _held_interrupts = _held_interrupts, 0
    return held


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """:func:`hold_interrupts` for the block; a Ctrl-C held is raised at its end
    (unless the block raised)."""
    hold_interrupts()
    try:
        yield
    except BaseException:
        _stop_holding()
        raise
    release_held_interrupt()
