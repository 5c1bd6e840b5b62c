"""Retrying transient sink errors with capped exponential backoff.

A transient error (a lost connection, a lock, a serialization failure) is retried
in place; after ``max_attempts`` the last error is raised so the bundle fails
loudly and the runner retries it. A transient error never sends a good record to
the dead-letter queue.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, TypeVar

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
MAX_ATTEMPTS = 8  # about 11 s of waits from first_delay_s 0.1 to max_delay_s 5


class DatabaseUnreachable(RuntimeError):
    """A database server did not answer, or dropped the connection, through every
    retry: a service error (the same run can work later), not a wrong flag."""


def call_with_retries(
    action: Callable[[], T],
    is_transient: Callable[[BaseException], bool],
    *,
    what: str,
    max_attempts: Optional[int] = None,
    first_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    on_retry: Optional[Callable[[BaseException], None]] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Runs ``action``; on a transient error waits and tries again, up to the cap
    (``max_attempts`` tries in all, :data:`MAX_ATTEMPTS` when not given)."""
    if max_attempts is None:
        max_attempts = MAX_ATTEMPTS
    delay = first_delay_s
    for attempt in range(1, max_attempts + 1):
        try:
            return action()
        except Exception as error:  # classified just below; permanent ones re-raised
            if not is_transient(error) or attempt == max_attempts:
                raise
            _LOGGER.warning("%s failed (attempt %d of %d), retrying in %.1fs: %s",
                            what, attempt, max_attempts, delay, error)
            if on_retry is not None:
                on_retry(error)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")
