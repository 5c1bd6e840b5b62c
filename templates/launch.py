"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in templates/Dockerfile).

Runs ``onceflow.pipelines.$ONCEFLOW_PIPELINE`` exactly as ``python -m`` would,
with the flags the template launcher passes. It lives outside the package so
that running it by path puts only this folder (no module named like a stdlib
one) at the front of ``sys.path``.
"""

import os
import re
import runpy
import sys


def main() -> None:
    name = os.environ.get("ONCEFLOW_PIPELINE", "aggregate")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        sys.exit(f"launch.py: ONCEFLOW_PIPELINE={name!r} is not a pipeline module name")
    sys.argv[0] = f"onceflow.pipelines.{name}"
    runpy.run_module(f"onceflow.pipelines.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
