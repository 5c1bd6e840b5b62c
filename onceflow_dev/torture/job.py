"""The live aggregate job as the torture run drives it: started as a child process
in its own process group, killed with SIGKILL, started again, stopped."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def process_group_rss_bytes(group: int) -> int:
    """Resident memory of every process in a process group (the job, its runner
    and worker processes), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != group:  # the fields after "(comm)": state, ppid, pgrp, ...
                continue
            with open(f"/proc/{entry}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE_BYTES
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return total


class LiveJob:
    """``python -m onceflow.pipelines.aggregate`` with fixed flags, (re)started on
    demand. Each start appends to one log file. On a job service (Flink), a killed
    client's job is cancelled on the service before the next start, as a
    supervisor would: it would otherwise keep its slots, restarting forever."""

    def __init__(self, flags: Sequence[str], log_path: pathlib.Path, job_endpoint: Optional[str] = None,
                 job_name: str = "onceflow-torture"):
        self._flags = list(flags)
        self._log_path = log_path
        self._job_endpoint = job_endpoint
        self._job_name = job_name
        self._process: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        argv: List[str] = [sys.executable, "-m", "onceflow.pipelines.aggregate", *self._flags]
        if self._job_endpoint:
            argv.append(f"--job_name={self._job_name}-{self.starts}")
        with open(self._log_path, "ab") as log:
            log.write(f"\n--- start {self.starts} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    def rss_bytes(self) -> int:
        return 0 if not self.running() else process_group_rss_bytes(self._process.pid)

    def kill(self) -> None:
        """SIGKILL to the whole process group, as a crash would."""
        self._signal_and_wait(signal.SIGKILL, 30)
        self._cancel_on_service()

    def stop(self) -> None:
        """SIGINT (the job cancels its pipeline), SIGKILL after 60 s."""
        if not self._signal_and_wait(signal.SIGINT, 60):
            self._signal_and_wait(signal.SIGKILL, 30)
        self._cancel_on_service()

    def _signal_and_wait(self, sig: signal.Signals, timeout_s: float) -> bool:
        if self._process is None:
            return True
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self._process.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _cancel_on_service(self) -> None:
        if self._job_endpoint:
            from onceflow_dev.devstack.flink import cancel_running_jobs

            cancel_running_jobs(self._job_endpoint, name_prefix=self._job_name)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
