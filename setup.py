"""Package metadata for onceflow.

This file is also what Dataflow runs on workers for ``--setup_file ./setup.py``:
it must stay importable with nothing but setuptools installed, so the pinned
versions are read from ``onceflow/versions.py`` as text, not imported.
"""

import pathlib
import re

import sys

import setuptools

_HERE = pathlib.Path(__file__).resolve().parent


def _pinned(name: str) -> str:
    text = (_HERE / "onceflow" / "versions.py").read_text(encoding="utf-8")
    match = re.search(rf'^{name}\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{name} is not set in onceflow/versions.py")
    return match.group(1)


BEAM_VERSION = _pinned("BEAM_VERSION")

def _packages():
    """The runtime package, and the development tools (``onceflow_dev``: ``onceflow
    dev``, ``onceflow torture``) except in an sdist: an sdist is the worker package
    Beam builds from ``--setup_file ./setup.py`` (``python setup.py sdist``, or
    ``python -m build --sdist``), and workers never need the dev tools."""
    include = ["onceflow", "onceflow.*"]
    if "sdist" not in sys.argv:
        include += ["onceflow_dev", "onceflow_dev.*"]
    return setuptools.find_namespace_packages(include=include)


setuptools.setup(
    name="onceflow",
    version=_pinned("ONCEFLOW_VERSION"),
    description=(
        "Apache Beam pipelines and PTransforms for event streams that must be "
        "neither lost nor double-counted"
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8")
    if (_HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=_packages(),
    package_data={"onceflow": ["sample_data/*"]},
    include_package_data=True,
    install_requires=[
        f"apache-beam=={BEAM_VERSION}",
        "fastavro>=1.9",
        "pyarrow>=14",
        "prometheus-client>=0.20",
        "orjson>=3.9",
        "msgspec>=0.18",
    ],
    extras_require={
        "kafka": ["confluent-kafka>=2.4"],
        "postgres": ["psycopg[binary]>=3.1"],
        # --input_format json_registry validates against the registry's JSON Schema when installed
        "registry": ["jsonschema>=4.18"],
        "gcp": [f"apache-beam[gcp]=={BEAM_VERSION}", "google-cloud-bigquery>=3.20"],
        # Beam YAML (jinja2, jsonschema, pandas, ...): for onceflow.yaml_provider and templates/yaml/
        "yaml": [f"apache-beam[yaml]=={BEAM_VERSION}"],
        "dev": [
            # pytest 9.2 keeps node IDs in a form pytest-xdist 3.8's --dist loadgroup no
            # longer marks, so its groups are silently ignored (pytest-xdist issue 1386):
            # tests/conftest.py refuses to run them ungrouped.
            "pytest>=8,<9.2",
            "pytest-xdist>=3.5",  # scripts/test.sh runs the tests in two processes
            "hypothesis>=6.100",
            "confluent-kafka>=2.4",
            "psycopg[binary]>=3.1",
            "matplotlib>=3.8",
            f"apache-beam[yaml]=={BEAM_VERSION}",  # tests/test_yaml_provider.py
            "jsonschema>=4.18",
            "uv>=0.4",  # tests/deploy/test_sdist.py installs the sdist into fresh environments with it
        ],
    },
    entry_points={"console_scripts": ["onceflow=onceflow.cli:main"]},
)
