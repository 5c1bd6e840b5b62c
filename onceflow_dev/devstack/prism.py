"""Prism, Beam's Go portable runner, built at the pinned Beam version.

``go install github.com/apache/beam/sdks/v2/go/cmd/prism@v<BEAM_VERSION>`` puts
the binary in ``cache/prism-<BEAM_VERSION>/bin/prism`` (about 70 s the first
time, from the Go module proxy). Prism is not a daemon: the Python SDK starts
it per pipeline. Pass it explicitly so a pipeline never silently falls back to
the batch-only FnApiRunner::

    --runner=PrismRunner --prism_location=<prism_location()>

``~/.apache_beam/cache`` is deliberately not seeded, so ``--runner=DirectRunner``
behaves the same here as anywhere else.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from typing import Any

from onceflow_dev.devstack.common import progress, require_tool, run_logged
from onceflow.errors import ServiceError
from onceflow.runners import built_prism, prism_binary_path
from onceflow.versions import BEAM_VERSION

NAME = "prism"
MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"
BUILD_TIMEOUT = 900.0


def binary_path() -> pathlib.Path:
    """Where the prism binary for BEAM_VERSION is (or will be) built: the place
    the main job looks for it (:func:`onceflow.runners.prism_binary_path`)."""
    return prism_binary_path()


def _folder() -> pathlib.Path:
    return binary_path().parent.parent


def prism_location() -> str | None:
    """The path of the built prism binary, or None when it has not been built yet."""
    return built_prism()


def runs(path: pathlib.Path) -> bool:
    """True when ``prism --help`` exits 0 (the binary is whole and executable here)."""
    try:
        result = subprocess.run(
            [str(path), "--help"], check=False, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def up() -> bool:
    """Build prism unless it is built; True when this call built it."""
    if prism_location() is not None and runs(binary_path()):
        return False
    go = require_tool(
        "go",
        "install Go 1.24+ (https://go.dev/dl/) and put its bin folder on PATH",
        extra_dirs=("/usr/local/go/bin",),
    )
    folder = _folder()
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    progress(f"building Prism {BEAM_VERSION} with go install (first time only, about a minute)...")
    env = dict(os.environ, GOBIN=str(bin_dir))
    run_logged(
        [go, "install", f"{MODULE}@v{BEAM_VERSION}"],
        folder / "build.log",
        f"building prism {BEAM_VERSION}",
        cwd=folder,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    if not runs(binary_path()):
        raise ServiceError(f"built {binary_path()} but 'prism --help' fails (log: {folder / 'build.log'})")
    return True


def down() -> bool:
    """Nothing to stop: Prism runs per pipeline. Always False."""
    return False


def status() -> dict[str, Any]:
    """Whether the binary exists and runs, and the flags that select it."""
    path = binary_path()
    exists = path.is_file()
    healthy = exists and runs(path)
    return {
        "healthy": healthy,
        "path": str(path),
        "exists": exists,
        "beam_version": BEAM_VERSION,
        "pipeline_args": ["--runner=PrismRunner", f"--prism_location={path}"] if healthy else [],
    }
