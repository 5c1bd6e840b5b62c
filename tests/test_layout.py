"""Where things live: the runtime package never imports the development tools.

Workers install only ``onceflow`` (tests/deploy/test_sdist.py builds that package
and looks); here every module of it is read, imports inside functions included.
The console script names the dev subcommands' modules as text and imports them
only when they are installed.
"""

import ast
import pathlib
import subprocess
import sys

import onceflow

PACKAGE = pathlib.Path(onceflow.__file__).parent


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_runtime_module_imports_the_development_tools():
    offenders = {str(path.relative_to(PACKAGE)): sorted(name for name in _imports(path)
                                                         if name.split(".")[0] == "onceflow_dev")
                 for path in PACKAGE.rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}
    assert not (PACKAGE / "devstack").exists() and not (PACKAGE / "torture").exists()


def test_the_kafka_package_imports_cheaply():
    """``import onceflow.io.kafka`` loads neither the Kafka client nor Beam (its
    modules do, each when imported)."""
    shown = subprocess.run([sys.executable, "-c", "import sys, onceflow.io.kafka; "
                            "print(sorted(m for m in ('confluent_kafka', 'apache_beam') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert shown.stdout.strip() == "[]"
