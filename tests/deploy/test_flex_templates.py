"""Flex Template specs and the image: generated from the options, consistent with
the validators, pinned to the one Beam version. (Docker cannot run here: the
Dockerfile is checked as text.)"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from onceflow import flex_templates
from onceflow.options import parse_pipeline_args
from onceflow.pipelines.aggregate import job_from_options
from onceflow.versions import BEAM_VERSION

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates"
DOCKERFILE = TEMPLATES / "Dockerfile"


def _cli(*args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onceflow.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _metadata(name: str = "aggregate") -> dict:
    return json.loads((TEMPLATES / name / "metadata.json").read_text(encoding="utf-8"))


def _example(parameter: dict) -> str:
    return parameter["helpText"].rsplit("Example: ", 1)[1]


# -- the check ---------------------------------------------------------------


def test_generate_check_passes_on_the_committed_files():
    result = _cli("templates", "generate", "--check")
    assert result.returncode == 0, result.stderr


def test_check_names_the_stale_file_in_one_line(tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES, copy)
    spec = copy / "aggregate" / "metadata.json"
    spec.write_text(spec.read_text().replace('"Window size"', '"Window length"'))
    result = _cli("templates", "generate", "--check", "--dir", str(copy))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING:")]
    assert len(lines) == 1 and "aggregate/metadata.json is stale" in lines[0], result.stderr


def test_check_catches_a_dockerfile_pinned_to_another_beam(tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES, copy)
    dockerfile = copy / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(f"ARG BEAM_VERSION={BEAM_VERSION}",
                                                         "ARG BEAM_VERSION=2.60.0"))
    result = _cli("templates", "generate", "--check", "--dir", str(copy))
    assert result.returncode == 1 and "Dockerfile is stale" in result.stderr


def test_generate_writes_the_specs_and_pins_the_dockerfile(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "Dockerfile").write_text(DOCKERFILE.read_text().replace(
        f"ARG BEAM_VERSION={BEAM_VERSION}", "ARG BEAM_VERSION=0.0.1"))
    result = _cli("templates", "generate", "--dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "aggregate" / "metadata.json").read_text() == \
        (TEMPLATES / "aggregate" / "metadata.json").read_text()
    assert (folder / "Dockerfile").read_text() == DOCKERFILE.read_text()
    assert _cli("templates", "generate", "--check", "--dir", str(folder)).returncode == 0


def _error_lines(result: subprocess.CompletedProcess) -> list:
    return [line for line in result.stderr.splitlines() if not line.startswith("WARNING:")]


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["generate", "check"])
def test_a_dockerfile_without_the_beam_version_line_is_named_in_one_line(tmp_path, check):
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    result = _cli("templates", "generate", *check, f"--dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == [f"onceflow: error: {tmp_path / 'Dockerfile'} has no 'ARG BEAM_VERSION=...' "
                                    f"line; add one, e.g. ARG BEAM_VERSION={BEAM_VERSION}"]


def test_a_dockerfile_that_is_a_folder_is_named_in_one_line(tmp_path):
    (tmp_path / "Dockerfile").mkdir()
    result = _cli("templates", "generate", f"--dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == [f"onceflow: error: {tmp_path / 'Dockerfile'} is a folder, not a Dockerfile"]


def test_a_generated_file_that_cannot_be_written_is_named_in_one_line(tmp_path):
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())
    (tmp_path / "aggregate" / "metadata.json").mkdir(parents=True)
    result = _cli("templates", "generate", f"--dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == [
        f"onceflow: error: cannot read or write {tmp_path / 'aggregate' / 'metadata.json'}: Is a directory"]


def test_a_dir_without_a_dockerfile_is_named_without_asking_for_dir_again(tmp_path):
    result = _cli("templates", "generate", f"--dir={tmp_path}")
    assert result.returncode == 2
    assert _error_lines(result) == [f"onceflow: error: --dir: {tmp_path / 'Dockerfile'} not found; --dir must be "
                                    "the templates folder that holds the Dockerfile"]
    result = _cli("templates", "generate", f"--dir={tmp_path / 'nope'}")
    assert result.returncode == 2 and _error_lines(result) == [
        f"onceflow: error: --dir: {tmp_path / 'nope'} is not a folder; give the templates folder that holds the "
        "Dockerfile"]


def test_an_empty_dir_is_refused_not_taken_as_the_current_folder(tmp_path):
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    result = _cli("templates", "generate", "--dir=", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == ["onceflow templates generate: error: argument --dir: '' is empty; give the "
                                    "templates folder, e.g. --dir=templates; see onceflow templates generate --help"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Dockerfile"]  # nothing written there


def test_an_unknown_flag_is_one_line_naming_the_actions_own_help():
    result = _cli("templates", "generate", "--bogus")
    assert result.returncode == 2
    assert _error_lines(result) == ["onceflow templates generate: error: unrecognized arguments: --bogus; see "
                                    "onceflow templates generate --help"]


# -- metadata ---------------------------------------------------------------------------


def test_every_pipeline_module_is_registered():
    """A new runnable pipeline (onceflow/pipelines/<name>.py with build and
    job_from_options) needs one line in flex_templates.PIPELINES."""
    pipelines = REPO / "onceflow" / "pipelines"
    runnable = sorted(
        path.stem for path in pipelines.glob("*.py")
        if re.search(r"^def build\(", path.read_text(), re.M)
        and re.search(r"^def job_from_options\(", path.read_text(), re.M)
    )
    assert "aggregate" in runnable
    assert sorted(p.name for p in flex_templates.PIPELINES) == runnable


@pytest.mark.parametrize("pipeline", flex_templates.PIPELINES, ids=lambda p: p.name)
def test_metadata_lists_every_flag_with_the_fields_dataflow_reads(pipeline):
    spec = _metadata(pipeline.name)
    assert spec["name"] and spec["description"]
    flags = [flag.name for flag in flex_templates.flags(pipeline.option_classes)]
    assert [p["name"] for p in spec["parameters"]] == flags
    assert len(set(flags)) == len(flags)
    for parameter in spec["parameters"]:
        assert set(parameter) == {"name", "label", "helpText", "isOptional", "regexes"}, parameter
        assert re.fullmatch(r"[a-z][a-z0-9_]*", parameter["name"])
        assert parameter["label"] and parameter["helpText"]
        assert isinstance(parameter["isOptional"], bool) and len(parameter["regexes"]) == 1


def test_the_aggregate_help_and_the_metadata_agree():
    from onceflow.options import ONCEFLOW_OPTION_CLASSES, help_text

    shown = set(re.findall(r"--([a-z_]+)", help_text("aggregate", "")))
    names = {p["name"] for p in _metadata()["parameters"]}
    assert names <= shown
    assert flex_templates.PIPELINES[0].option_classes == ONCEFLOW_OPTION_CLASSES


def test_remote_sink_and_dead_letter_queue_are_required_on_dataflow():
    by_name = {p["name"]: p for p in _metadata()["parameters"]}
    assert by_name["sink"]["isOptional"] is False and by_name["dlq"]["isOptional"] is False
    assert by_name["window"]["isOptional"] is True


@pytest.mark.parametrize("name", sorted(flex_templates.RULES))
def test_each_regex_accepts_the_example_in_its_own_help_text(name):
    parameters = {p["name"]: p for p in _metadata()["parameters"]}
    if name not in parameters:
        pytest.fail(f"RULES has --{name}, which no pipeline defines any more: remove it")
    parameter = parameters[name]
    example = _example(parameter)
    assert example == flex_templates.RULES[name].example
    for regex in parameter["regexes"]:
        assert re.fullmatch(regex, example), (regex, example)
        for bad in flex_templates.RULES[name].invalid:
            assert not re.fullmatch(regex, bad), (name, bad)


def test_every_parameter_with_an_example_accepts_it():
    for parameter in _metadata()["parameters"]:
        if "Example: " in parameter["helpText"]:
            assert re.fullmatch(parameter["regexes"][0], _example(parameter)), parameter["name"]


# Flags that only make sense with a Kafka input are validated with one.
_KAFKA_INPUT = "--input=kafka://127.0.0.1:9092/orders"
_NEEDS_KAFKA = {"from", "to", "kafka_group", "kafka_setting", "kafka_config_file", "kafka_time_source",
                "kafka_idle_timeout", "kafka_readers", "allow_retention_gaps"}


# Flags naming a file the job reads: validated with an existing file in its place.
_NEEDS_FILE = {"kafka_config_file": "security.protocol=PLAINTEXT\n",
               "avro_reader_schema": '{"type": "record", "name": "Order", "fields": []}'}
# Flags that only an avro_registry read from Kafka takes.
_NEEDS_REGISTRY = {"schema_registry_url", "schema_registry_setting", "avro_reader_schema"}


@pytest.mark.parametrize("name", sorted(flex_templates.RULES))
def test_each_example_passes_the_flag_validator(name, tmp_path, monkeypatch):
    """The regex is no looser than the pipeline on its own example: the value a
    template user copies from the help text also starts the job."""
    # The template's container installs apache-beam[gcp] (templates/Dockerfile); this
    # environment need not have it, and the job would ask for it for a gs:// --input.
    monkeypatch.setattr("onceflow.pipelines.aggregate.missing_filesystem", lambda path: None)
    example = flex_templates.RULES[name].example
    if name in _NEEDS_FILE:
        assert re.fullmatch(flex_templates.RULES[name].regex, str(tmp_path / "f"))
        (tmp_path / "f").write_text(_NEEDS_FILE[name])
        example = str(tmp_path / "f")
    argv = [f"--{name}={example}"]
    if name in _NEEDS_KAFKA:
        argv.insert(0, _KAFKA_INPUT)
    if name in _NEEDS_REGISTRY:
        argv = [_KAFKA_INPUT, "--input_format=avro_registry", "--schema_registry_url=http://127.0.0.1:8081",
                *argv[-1:]]
    job_from_options(parse_pipeline_args(argv))


def test_defaults_pass_their_regex_where_the_template_is_not_stricter():
    for pipeline in flex_templates.PIPELINES:
        for flag in flex_templates.flags(pipeline.option_classes):
            rule = flex_templates.RULES.get(flag.name)
            if rule is None or rule.note or flag.default is None:
                continue
            assert re.fullmatch(rule.regex, str(flag.default)), (flag.name, flag.default)


def test_regexes_use_only_syntax_java_re2_and_python_share():
    for pipeline in flex_templates.PIPELINES:
        for parameter in json.loads(flex_templates.metadata_text(pipeline))["parameters"]:
            for regex in parameter["regexes"]:
                re.compile(regex)
                assert regex.startswith("^") and regex.endswith("$"), regex
                assert not re.search(r"\(\?[=!<]|\\[1-9]|[*+?}]\+", regex), regex


def test_a_flag_without_a_rule_gets_a_generic_entry():
    flag = flex_templates.Flag("some_new_flag", "Something new. Default: x.", "x", None, False)
    entry = flex_templates.parameter(flag)
    assert entry["label"] == "Some new flag" and entry["isOptional"] is True
    assert re.fullmatch(entry["regexes"][0], "anything on one line")
    assert not re.fullmatch(entry["regexes"][0], "two\nlines")
    choice = flex_templates.parameter(flex_templates.Flag("mode", "Mode.", "a", ("a", "b.c"), False))
    assert choice["regexes"] == [r"^(a|b\.c)$"] and choice["helpText"].endswith("Example: a")


# -- the image ---------------------------------------------------------------------------


def _dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_dockerfile_beam_version_is_the_pinned_one():
    assert flex_templates.dockerfile_beam_version(_dockerfile()) == BEAM_VERSION


def test_dockerfile_is_both_sdk_worker_and_template_launcher():
    text = _dockerfile()
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert froms[-1][0] == "apache/beam_python3.11_sdk:${BEAM_VERSION}", froms
    launcher = [image for image, alias in froms if alias == "launcher"]
    assert launcher and launcher[0].startswith("gcr.io/dataflow-templates-base/python311-template-launcher-base:")
    assert ("COPY --from=launcher /opt/google/dataflow/python_template_launcher "
            "/opt/google/dataflow/python_template_launcher") in text
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/launch.py" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    # Installed at build time; nothing that would make workers pip-install at start.
    assert re.search(r'^RUN pip install --no-cache-dir "/tmp/onceflow-src\[kafka,postgres,gcp\]"', text, re.M)
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE=" not in text
    assert "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE=" not in text


def test_dockerfile_lint():
    """A few hadolint-style rules, as text: tagged base images, ARGs declared
    before use, COPY sources that exist and are not excluded from the context."""
    text = _dockerfile()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    declared = set()
    for line in lines:
        if line.startswith("ARG "):
            declared.add(line[4:].split("=", 1)[0])
        for used in re.findall(r"\$\{([A-Z_]+)\}", line):
            assert used in declared, f"{used} used before ARG: {line}"
        if line.startswith("FROM "):
            image = line.split()[1]
            assert ":" in image.rsplit("/", 1)[-1], f"untagged base image: {line}"
    assert not re.search(r"^RUN .*\b(apt-get upgrade|sudo)\b", text, re.M)
    ignore = (TEMPLATES / "Dockerfile.dockerignore").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore, f"{source} is excluded from the build context"
    setup = (REPO / "setup.py").read_text()
    for extra in ("kafka", "postgres", "gcp"):
        assert f'"{extra}":' in setup


def test_cloudbuild_builds_this_dockerfile():
    config = yaml.safe_load((TEMPLATES / "cloudbuild.yaml").read_text())
    args = config["steps"][0]["args"]
    assert args[:3] == ["build", "-f", "templates/Dockerfile"] and args[-1] == "."
    assert config["images"] == ["${_IMAGE}"]


def test_build_script_reads_the_pinned_version():
    script = REPO / "scripts" / "build_image.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    read = subprocess.run(
        [sys.executable, "-c", 'import runpy, sys; print(runpy.run_path(sys.argv[1])["BEAM_VERSION"])',
         str(REPO / "onceflow" / "versions.py")], capture_output=True, text=True, check=True)
    assert read.stdout.strip() == BEAM_VERSION
    assert "--build-arg \"BEAM_VERSION=$beam_version\"" in script.read_text()


def test_launcher_entry_point_runs_the_pipeline_module(tmp_path):
    """What the template launcher runs (FLEX_TEMPLATE_PYTHON_PY_FILE), by path,
    from another folder."""
    result = subprocess.run(
        [sys.executable, str(TEMPLATES / "launch.py"), "--help"], cwd=tmp_path,
        env={**__import__("os").environ, "ONCEFLOW_PIPELINE": "aggregate"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--sink" in result.stdout and "--window" in result.stdout
    bad = subprocess.run([sys.executable, str(TEMPLATES / "launch.py")], cwd=tmp_path,
                         env={**__import__("os").environ, "ONCEFLOW_PIPELINE": "../x"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "not a pipeline module name" in bad.stderr
