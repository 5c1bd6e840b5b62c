"""The helpers every dev service uses: the project-local folder, ports, tools,
pid files, waiting on a condition with a deadline, running logged commands.
:mod:`onceflow_dev.devstack.service` builds a service's process on them.

Layout under the project-local folder (``$ONCEFLOW_HOME``, else ``./.onceflow``)::

    cache/<artifact>-<version>/   downloads and builds (jars, the prism binary), kept
    <service>/                    a service's data, config, ``<service>.log`` and ``<service>.pid``
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import BinaryIO, Callable, Sequence

from onceflow.errors import ServiceError
from onceflow.runners import onceflow_home

HOST = "127.0.0.1"


def home() -> pathlib.Path:
    """The project-local folder: ``$ONCEFLOW_HOME`` if set, else ``./.onceflow``."""
    return onceflow_home()


def cache_dir(name: str) -> pathlib.Path:
    """A folder for a cached download or build, e.g. ``cache/kafka-4.1.1``."""
    return home() / "cache" / name


def service_dir(service: str) -> pathlib.Path:
    """The folder holding a service's data, config, log and pid file."""
    return home() / service


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays clean for ``status --json``)."""
    print(f"onceflow dev: {message}", file=sys.stderr, flush=True)


# --- ports -------------------------------------------------------------------------


def env_port(variable: str, default: int) -> int:
    """A port taken from an environment variable, else ``default``."""
    raw = os.environ.get(variable)
    if raw is None or raw == "":
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ServiceError(f"{variable}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ServiceError(f"{variable}={raw!r} is not a port number (1-65535)")
    return port


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on ``host:port`` (so a server could not bind it).

    A bind test, not a connect test: it also catches a listener on the wildcard
    address, and SO_REUSEADDR keeps connections in TIME_WAIT from counting.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def require_free_ports(service: str, ports: dict[str, int]) -> None:
    """Raise ServiceError naming the first port (and its variable) already taken."""
    for variable, port in ports.items():
        if port_in_use(port):
            raise ServiceError(
                f"cannot start {service}: port {port} on {HOST} is in use by another "
                f"process; stop that process or set {variable} to a free port"
            )


def can_connect(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- tools -------------------------------------------------------------------------


def require_tool(name: str, hint: str, extra_dirs: Sequence[str] = ()) -> str:
    """The path of executable ``name`` (on PATH or in ``extra_dirs``), else ServiceError."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    found = shutil.which(name, path=search)
    if found is None:
        raise ServiceError(f"'{name}' is not installed or not on PATH: {hint}")
    return found


def require_java() -> str:
    """The path of ``java``, else ServiceError saying how to install it."""
    return require_tool("java", "install a Java 17+ runtime (Debian: apt-get install -y openjdk-17-jre-headless)")


# --- pid files -----------------------------------------------------------------------


def write_pid(path: pathlib.Path, pid: int) -> None:
    """Record the pid of a process this package started."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n", encoding="ascii")
    tmp.replace(path)


def read_pid(path: pathlib.Path) -> int | None:
    """The pid in a pid file (first line), or None when absent or unreadable."""
    try:
        first = path.read_text(encoding="ascii").splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def process_matches(pid: int, marker: str) -> bool:
    """True when process ``pid`` is alive and its command line contains ``marker``.

    The marker (a path unique to this project-local folder) guards against a
    recycled pid: we never signal a process that is not ours.
    """
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if not raw:  # a zombie has an empty command line
        return False
    return marker in raw.replace(b"\0", b" ").decode("utf-8", "replace")


def running_pid(pid_file: pathlib.Path, marker: str, remove_stale: bool = True) -> int | None:
    """The pid recorded in ``pid_file`` if that process still runs and is ours.

    A stale pid file (process gone or pid reused) is removed unless
    ``remove_stale`` is false (for pid files a server manages itself).
    """
    pid = read_pid(pid_file)
    if pid is None:
        return None
    if process_matches(pid, marker):
        return pid
    if remove_stale:
        pid_file.unlink(missing_ok=True)
    return None


def stop_process(pid: int, marker: str, timeout: float = 30.0) -> None:
    """SIGTERM the process group we started, wait for it to exit, SIGKILL if it won't."""
    if not process_matches(pid, marker):
        return
    _signal_group(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not process_matches(pid, marker), timeout, f"pid {pid} to exit")
    except ServiceError:
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not process_matches(pid, marker), 10.0, f"pid {pid} to die")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: group id == pid
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


# --- waiting -------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    log: pathlib.Path | None = None,
    interval: float = 0.2,
) -> None:
    """Poll ``condition`` until it is true or ``timeout`` seconds have passed.

    ``alive`` (optional) is checked on every poll: when the process died there
    is no point waiting any longer. On failure the log's last lines are printed
    and ServiceError names the log.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if alive is not None and not alive():
            fail(f"{what}: the process exited", log)
        if time.monotonic() >= deadline:
            fail(f"timed out after {timeout:.0f}s waiting for {what}", log)
        time.sleep(interval)


def fail(message: str, log: pathlib.Path | None = None, lines: int = 25) -> None:
    """Print the last lines of ``log`` (if any) to stderr, then raise ServiceError."""
    if log is not None:
        tail = log_tail(log, lines)
        if tail:
            print(f"--- last lines of {log} ---", file=sys.stderr)
            print(tail, file=sys.stderr)
            print("---", file=sys.stderr, flush=True)
        raise ServiceError(f"{message} (log: {log})")
    raise ServiceError(message)


def log_tail(path: pathlib.Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a text file, or '' if it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# --- running commands ------------------------------------------------------------------


def _open_log(log: pathlib.Path, command: Sequence[str]) -> BinaryIO:
    """``log`` opened for appending, after a line with the time and ``command``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n".encode())
    out.flush()
    return out


def start_background(
    command: Sequence[str], log: pathlib.Path, cwd: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running process detached from this one (own session), its
    stdout and stderr appended to ``log``; return it.

    While it starts, check liveness with ``process.poll() is None``, not with
    the pid file: until ``exec`` completes its command line is still ours.
    """
    with _open_log(log, command) as out:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process


def run_logged(
    command: Sequence[str],
    log: pathlib.Path,
    what: str,
    cwd: pathlib.Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
) -> None:
    """Run a command to completion with its output appended to ``log``;
    ServiceError (with the log's tail printed) when it fails or overruns."""
    with _open_log(log, command) as out:
        try:
            completed = subprocess.run(
                list(command),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            fail(f"{what} took longer than {timeout:.0f}s", log)
    if completed.returncode != 0:
        fail(f"{what} failed (exit status {completed.returncode})", log)


def grpc_answers(port: int, method: str, timeout: float) -> bool:
    """True when a gRPC service on ``127.0.0.1:port`` accepts a connection and
    answers ``method`` called with an empty request (b"" is an empty protobuf
    message). Raw calls keep apache_beam, slow to import, out of ``onceflow dev status``."""
    if not can_connect(port):
        return False
    import grpc

    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
        try:
            call(None, timeout=timeout)
        except grpc.RpcError:
            return False
    return True
