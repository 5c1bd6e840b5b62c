"""A long-running process of a dev service, started and stopped by this package.

A service module says only what is its own (ports, command, readiness probe,
status details) and builds a :class:`ManagedService` for the rest, which every
service does alike: the pid file and log, the marker that tells the process is
ours, "already up" and "running but not answering", starting in the background
and waiting until it answers, stopping, and the status fields all share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import pathlib
import subprocess
from typing import Any, Callable, Iterator, Sequence

from onceflow_dev.devstack.common import (
    progress,
    running_pid,
    start_background,
    stop_process,
    wait_until,
    write_pid,
)
from onceflow.errors import ServiceError


@dataclasses.dataclass(frozen=True)
class ManagedService:
    """One process of a dev service and how to tell it runs, answers, and is ours.

    ``name`` is the service as ``--services`` spells it (``kafka``); ``label``
    how messages call the process (``Kafka``, ``the Flink job server``);
    ``marker`` a string on the process's command line unique to this service
    and project folder, so that a recycled pid is never taken for ours;
    ``address`` where it answers, for messages; ``answers`` the readiness probe.
    ``server_writes_pid_file``: the server writes and removes its pid file
    itself (PostgreSQL), so a stale one is left alone.
    """

    name: str
    label: str
    folder: pathlib.Path
    pid_file: pathlib.Path
    log: pathlib.Path
    marker: str
    address: str
    answers: Callable[[], bool]
    server_writes_pid_file: bool = False

    @contextlib.contextmanager
    def locked(self, create: bool = True) -> Iterator[None]:
        """Holds the service's lock (``FOLDER/.lock``, ``flock``): a start or stop in
        another process waits for this one. Without it two processes starting the
        service at once (a test fixture and the torture's broker restart) each wrote
        the pid file, one start failed on the taken port, and the running server was
        left with no pid file: `onceflow dev` then called it down. ``create``: make
        the folder if it is missing (a start); a stop leaves a missing one alone."""
        if not create and not self.folder.exists():
            yield  # nothing ever ran from here: nothing to stop, nothing to create
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def pid(self) -> int | None:
        """The pid of the running process if it is ours, else None."""
        return running_pid(self.pid_file, self.marker, remove_stale=not self.server_writes_pid_file)

    def is_up(self) -> bool:
        """True when the process runs and answers (nothing to start); False when
        it does not run; ServiceError, saying what to run, when it runs but does
        not answer."""
        if self.pid() is None:
            return False
        if self.answers():
            return True
        raise ServiceError(
            f"{self.label} is running (pid file {self.pid_file}) but does not answer on {self.address}; "
            f"run 'onceflow dev down --services {self.name}' and retry"
        )

    def start(self, command: Sequence[str], timeout: float) -> subprocess.Popen[bytes]:
        """Starts ``command`` in the background in the service's folder, its output
        appended to the log, records its pid, and waits until it answers.
        ServiceError, with the log's last lines, when it exits first or does not
        answer within ``timeout`` seconds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        process = start_background(command, self.log, self.folder)
        write_pid(self.pid_file, process.pid)
        wait_until(self.answers, timeout, f"{self.label} to answer on {self.address}",
                   alive=lambda: process.poll() is None, log=self.log)
        return process

    def stop(self, timeout: float = 30.0) -> bool:
        """Stops the process if it runs and is ours (SIGTERM to its group, SIGKILL
        after ``timeout`` seconds); True when something was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        progress(f"stopping {self.label} (pid {pid})...")
        stop_process(pid, self.marker, timeout=timeout)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, Any]:
        """The fields every service's status has: ``healthy`` (runs and answers),
        ``pid`` (None when not running) and ``log``."""
        pid = self.pid()
        return {"healthy": pid is not None and self.answers(), "pid": pid, "log": str(self.log)}
