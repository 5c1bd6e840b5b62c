"""A throwaway PostgreSQL cluster on 127.0.0.1, from Debian's postgresql packages.

``initdb`` creates the cluster under ``postgres/data`` in the project-local
folder (superuser ``onceflow``, database ``onceflow``); ``pg_ctl`` starts it
listening on 127.0.0.1 only, its Unix socket in ``postgres/run``, its log in
``postgres/postgres.log``. Authentication is ``trust``: any local user may
connect as any role without a password. That is acceptable only because the
cluster is a disposable test fixture bound to the loopback interface; never
point it at real data.

PostgreSQL refuses to run as root, so when this runs as root the cluster is
owned by and run as the ``postgres`` system user (``runuser``); otherwise as
the current user. When no server binaries are found and this runs as root
with apt-get available, Debian's ``postgresql`` package is installed.

Port (environment variable, default): ``ONCEFLOW_POSTGRES_PORT`` (15432).
DSN: ``postgresql://onceflow@127.0.0.1:<port>/onceflow``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import pwd
import shutil
import stat
import subprocess
import tempfile
from typing import Any

from onceflow_dev.devstack.common import (
    HOST,
    env_port,
    fail,
    progress,
    require_free_ports,
    run_logged,
    service_dir,
    wait_until,
)
from onceflow_dev.devstack.service import ManagedService
from onceflow.errors import ServiceError

NAME = "postgres"
USER = "onceflow"
DATABASE = "onceflow"
RUN_AS_WHEN_ROOT = "postgres"
START_TIMEOUT = 60.0


def port() -> int:
    return env_port("ONCEFLOW_POSTGRES_PORT", 15432)


def dsn(database: str = DATABASE) -> str:
    """The libpq URI of the dev cluster (trust auth: no password)."""
    return f"postgresql://{USER}@{HOST}:{port()}/{database}"


def _dir() -> pathlib.Path:
    """``<project folder>/postgres``; when running as root and the ``postgres``
    user cannot traverse the project folder (a clone under a private folder), a
    folder under the system temp dir named after the project folder instead."""
    preferred = service_dir(NAME)
    if os.geteuid() != 0 or _others_can_traverse(preferred.parent.resolve()):
        return preferred
    digest = hashlib.sha256(str(preferred.resolve()).encode("utf-8")).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"onceflow-postgres-{digest}"


def _others_can_traverse(folder: pathlib.Path) -> bool:
    """Whether every existing folder from / to ``folder`` lets other users through."""
    for path in (folder, *folder.parents):
        if path.exists() and not path.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _data() -> pathlib.Path:
    return _dir() / "data"


def _log() -> pathlib.Path:
    return _dir() / "postgres.log"


def _service() -> ManagedService:
    """The postmaster, as ``pg_ctl`` starts it: it writes (and removes) its own
    ``postmaster.pid``, and ``postgres -D <data dir>`` on its command line marks
    it as ours. Started and stopped with ``pg_ctl``, not as a background process."""
    return ManagedService(name=NAME, label="PostgreSQL", folder=_dir(), pid_file=_data() / "postmaster.pid",
                          log=_log(), marker=str(_data()), address=f"{HOST}:{port()}",
                          answers=_accepts_connections, server_writes_pid_file=True)


def find_bindir() -> pathlib.Path | None:
    """The folder holding initdb, pg_ctl and pg_isready: ``$ONCEFLOW_PG_BINDIR``,
    else Debian's newest ``/usr/lib/postgresql/<major>/bin``, else PATH."""
    configured = os.environ.get("ONCEFLOW_PG_BINDIR")
    if configured:
        return pathlib.Path(configured)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(pathlib.Path(path).parent.parent.name)
        if pathlib.Path(path).parent.parent.name.isdigit()
        else 0,
    )
    if candidates:
        return pathlib.Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is not None:
        return pathlib.Path(os.path.realpath(initdb)).parent
    return None


def _ensure_bindir() -> pathlib.Path:
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() == 0 and shutil.which("apt-get"):
        progress("installing Debian's postgresql with apt-get (first time only)...")
        log = _dir() / "apt.log"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run_logged(["apt-get", "update", "-q"], log, "apt-get update", env=env)
        run_logged(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
            log,
            "apt-get install postgresql",
            env=env,
        )
        bindir = find_bindir()
        if bindir is not None:
            return bindir
    raise ServiceError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
        "postgresql (apt-get install -y postgresql) or set ONCEFLOW_PG_BINDIR"
    )


def _as_owner(command: list[str]) -> list[str]:
    """Prefix ``command`` so it runs as the cluster's owner."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam(RUN_AS_WHEN_ROOT)
    except KeyError:
        raise ServiceError(
            f"running as root, but there is no '{RUN_AS_WHEN_ROOT}' user to run PostgreSQL "
            f"as: create it (useradd --system {RUN_AS_WHEN_ROOT}) or run as a normal user"
        ) from None
    return ["runuser", "-u", RUN_AS_WHEN_ROOT, "--", *command]


def _prepare_dirs() -> None:
    """Create the data and socket folders, owned by the user that runs the server."""
    folder = _dir()
    for path in (folder, _data(), folder / "run"):
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(_data(), 0o700)
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(RUN_AS_WHEN_ROOT)
    for path in (_data(), folder / "run"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    # The server user must be able to reach its folders from /.
    reachable = subprocess.run(
        _as_owner(["test", "-w", str(_data())]), check=False, capture_output=True
    )
    if reachable.returncode != 0:
        raise ServiceError(
            f"the '{RUN_AS_WHEN_ROOT}' user cannot write {_data()}: set ONCEFLOW_HOME to a "
            "folder it can reach, e.g. /tmp/onceflow"
        )


def _log_writable() -> None:
    log = _log()
    log.touch(exist_ok=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam(RUN_AS_WHEN_ROOT)
        os.chown(log, owner.pw_uid, owner.pw_gid)


def _ready(bindir: pathlib.Path) -> bool:
    """True when the server accepts connections (pg_isready)."""
    result = subprocess.run(
        [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port()), "-d", "postgres"],
        check=False,
        capture_output=True,
    )
    return result.returncode == 0


def _accepts_connections() -> bool:
    """True when the server binaries are found and the server accepts connections."""
    bindir = find_bindir()
    return bindir is not None and _ready(bindir)


def _psql(bindir: pathlib.Path, sql: str, database: str = "postgres") -> str:
    result = subprocess.run(
        [str(bindir / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql,
         f"postgresql://{USER}@{HOST}:{port()}/{database}"],
        check=False,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise ServiceError(f"psql failed on {dsn(database)}: {result.stderr.strip()}")
    return result.stdout.strip()


def up() -> bool:
    """Start the cluster unless it already runs; True when this call started it.
    Starts and stops from several processes take turns."""
    with _service().locked():
        return _up()


def _up() -> bool:
    bindir = _ensure_bindir()
    service = _service()
    if service.is_up():
        return False
    require_free_ports(service.label, {"ONCEFLOW_POSTGRES_PORT": port()})
    _prepare_dirs()
    if not (_data() / "PG_VERSION").exists():
        progress(f"creating a PostgreSQL cluster in {_data()}...")
        run_logged(
            _as_owner([str(bindir / "initdb"), "-D", str(_data()), "-U", USER,
                       "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]),
            _dir() / "initdb.log",
            "initdb",
        )
    _log_writable()
    progress(f"starting PostgreSQL on {HOST}:{port()}...")
    options = f"-p {port()} -c listen_addresses={HOST} -k {_dir() / 'run'}"
    run_logged(
        _as_owner([str(bindir / "pg_ctl"), "-D", str(_data()), "-l", str(_log()),
                   "-o", options, "-w", "-t", str(int(START_TIMEOUT)), "start"]),
        _dir() / "pg_ctl.log",
        "pg_ctl start",
        timeout=START_TIMEOUT + 30,
    )
    wait_until(
        lambda: _ready(bindir),
        START_TIMEOUT,
        f"PostgreSQL to accept connections on {HOST}:{port()}",
        alive=lambda: service.pid() is not None,
        log=_log(),
    )
    if service.pid() is None:
        fail("PostgreSQL answered, but not the cluster started here", _log())
    if _psql(bindir, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
        _psql(bindir, f'CREATE DATABASE "{DATABASE}"')
    return True


def down() -> bool:
    """Stop the cluster if it runs from this folder; True when something was stopped."""
    with _service().locked(create=False):
        return _down()


def _down() -> bool:
    pid = _service().pid()
    if pid is None:
        return False
    bindir = find_bindir()
    progress(f"stopping PostgreSQL (pid {pid})...")
    if bindir is None:
        raise ServiceError("cannot find pg_ctl to stop PostgreSQL; set ONCEFLOW_PG_BINDIR")
    run_logged(
        _as_owner([str(bindir / "pg_ctl"), "-D", str(_data()), "-m", "fast", "-w", "-t", "60", "stop"]),
        _dir() / "pg_ctl.log",
        "pg_ctl stop",
        timeout=90.0,
    )
    return True


def server_version() -> str | None:
    """``SHOW server_version`` of the running cluster, or None if it does not answer."""
    bindir = find_bindir()
    if bindir is None or not _ready(bindir):
        return None
    return _psql(bindir, "SHOW server_version")


def status() -> dict[str, Any]:
    """Whether the cluster runs and accepts connections, and how to reach it."""
    info = _service().status()
    info.update({
        "dsn": dsn(),
        "port": port(),
        "server_version": server_version() if info["healthy"] else None,
        "auth": "trust (loopback only, throwaway cluster)",
        "data_dir": str(_data()),
    })
    return info
