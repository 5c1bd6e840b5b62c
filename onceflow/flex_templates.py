"""Dataflow Flex Template specs generated from the pipelines' PipelineOptions classes.

``onceflow templates generate`` writes, for every pipeline in :data:`PIPELINES`,
``templates/<name>/metadata.json`` (one parameter per flag: name, label, helpText,
isOptional, regexes), and sets the default of ``ARG BEAM_VERSION`` in
``templates/Dockerfile`` to :data:`onceflow.versions.BEAM_VERSION`. ``--check``
compares instead of writing. This module is pure: :func:`render` returns the
files' text; only :func:`write` and :func:`stale` touch the disk.

Regexes come from :data:`RULES`, a small explicit table mapping a flag to a regex
and an example that the flag's own validator accepts (``tests/deploy`` checks
both). The regexes use only what Java, RE2 and Python share (no look-around, no
back-references) and are anchored. A flag missing from the table still gets an
entry: its choices as an alternation, else any single line; :func:`generic_flags`
names such flags so the command can say so.

Template parameters are stricter than the flags where a value that works locally
cannot work on Dataflow: a local file as ``--sink`` or ``--dlq`` would stay on
one worker's disk, so the template requires a remote sink and dead-letter queue.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from onceflow.options import ONCEFLOW_OPTION_CLASSES
from onceflow.rows import DEFAULT_BATCH_ROWS
from onceflow.versions import BEAM_VERSION

# -- the registry: one line per pipeline ----------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplatePipeline:
    """A pipeline with a Flex Template: ``python -m onceflow.pipelines.<name>``,
    spec at ``templates/<name>/metadata.json``."""

    name: str
    title: str
    description: str
    option_classes: Tuple[type, ...]

    @property
    def module(self) -> str:
        return f"onceflow.pipelines.{self.name}"


PIPELINES: Tuple[TemplatePipeline, ...] = (
    TemplatePipeline(
        "aggregate", "onceflow aggregate",
        "Raw events (files or a Kafka topic) to windowed aggregates, upserted idempotently on "
        "(key fields, window_start, window_end); refused records go to a dead-letter queue.",
        ONCEFLOW_OPTION_CLASSES),
)

# -- the explicit table: flag -> regex and example --------------------------------

_DURATION = r"[0-9]+(ms|s|m|h|d)"
_POSITIVE_DURATION = r"[0-9]*[1-9][0-9]*(ms|s|m|h|d)"
_HOST_PORT = r"[A-Za-z0-9.\[\]:-]+:[0-9]{1,5}"
_KAFKA_URL = rf"kafka://{_HOST_PORT}(,{_HOST_PORT})*/[A-Za-z0-9._-]{{1,249}}"
_KAFKA_OUTPUT_URL = rf"{_KAFKA_URL}(\?format=(json|avro_registry))?"  # a sink's or DLQ's value format
_POSTGRES_URL = r"postgres(ql)?://([^\s/@]+@)?[^\s/:@?]+(:[0-9]{1,5})?/[^\s/?]+(\?\S*)?"
_ISO_TIME = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
             r"(Z|z|[+-][0-9]{2}:?[0-9]{2})?)?")
_POSITION = rf"(earliest|latest|offsets:[0-9]+=[0-9]+(,[0-9]+=[0-9]+)*|-?[0-9]+|{_ISO_TIME})"
_AGGREGATE = r"(count|(sum|min|max|mean|first|last):[A-Za-z0-9_]+)"
_FIELD = r"[^\s,]+"
_COLUMN = r"[A-Za-z_][A-Za-z0-9_]{0,62}"  # a key field is also a column of the sink's table


@dataclasses.dataclass(frozen=True)
class ParameterRule:
    """How one flag appears in a template. ``regex`` is matched against the whole
    value; ``example`` must pass both the regex and the flag's validator;
    ``invalid`` are values the regex must refuse (tests check the validator
    refuses them too, unless the template is stricter on purpose: ``note``)."""

    label: str
    regex: str
    example: str
    invalid: Tuple[str, ...] = ()
    required: bool = False
    note: str = ""


RULES: Dict[str, ParameterRule] = {
    # input
    "input": ParameterRule(
        "Input files or Kafka topic", rf"^({_KAFKA_URL}|gs://[^\s]+)$",
        "gs://my-bucket/events/*.jsonl.gz", invalid=("kafka://broker/orders", "data/*.jsonl", ""),
        note="On Dataflow give gs://BUCKET/PATH (a glob is fine) or kafka://HOST:PORT/TOPIC; "
             "omitted, the job reads the sample bundled in the image."),
    "input_format": ParameterRule("Input record format", r"^(json|avro|avro_registry|json_registry)$", "json",
                                  invalid=("csv", "avro-registry")),
    "schema_registry_url": ParameterRule(
        "Schema registry URL", r"^https?://[^\s]+$", "http://schema-registry:8081", invalid=("registry:8081", "")),
    "schema_registry_setting": ParameterRule(
        "Schema registry client setting", r"^[^\s=]+=.*$", "basic.auth.user.info=USER:PASSWORD",
        invalid=("=x", "nosign"), note="A template parameter takes one NAME=VALUE; the flag itself is repeatable."),
    "avro_reader_schema": ParameterRule(
        "Avro reader schema file", r"^[^\s]+$", "/etc/onceflow/event.avsc", invalid=("two words",),
        note="A path inside the launcher image (the launcher reads it when it builds the job)."),
    "from": ParameterRule(
        "Kafka read start", rf"^{_POSITION}$", "2026-11-02T09:00:00Z",
        invalid=("yesterday", "offsets:0=")),
    "to": ParameterRule(
        "Kafka read stop (bounded read)", rf"^{_POSITION}$", "latest", invalid=("end", "offsets:a=1")),
    "allow_retention_gaps": ParameterRule(
        "Allow retention gaps", r"^(true|false|yes|no|1|0)$", "true", invalid=("maybe", "2"),
        note="true: a bounded read over records retention has deleted reads what is left and reports the gap."),
    # kafka
    "kafka_group": ParameterRule("Kafka consumer group", r"^[^\s]+$", "onceflow-aggregate",
                                 invalid=("two words",)),
    "kafka_setting": ParameterRule(
        "Kafka client setting", r"^[^\s=]+=.*$", "security.protocol=SASL_SSL", invalid=("=x", "nosign"),
        note="A template parameter takes one NAME=VALUE; the flag itself is repeatable."),
    "kafka_config_file": ParameterRule(
        "Kafka client properties file", r"^[^\s]+$", "/etc/onceflow/kafka.properties", invalid=("two words",),
        note="A path inside the launcher image (the launcher reads it when it builds the job)."),
    "kafka_time_source": ParameterRule("Kafka event time source", r"^(field|record)$", "record",
                                       invalid=("broker",)),
    "kafka_idle_timeout": ParameterRule("Kafka idle partition timeout", rf"^{_POSITIVE_DURATION}$", "30s",
                                        invalid=("0", "30", "30 sec")),
    # event contract
    "key_fields": ParameterRule("Key fields", rf"^{_COLUMN}(,{_COLUMN})*$", "store,sku",
                                invalid=("store,", ",sku", "", "store-id", "a.b", "1st")),
    "time_field": ParameterRule("Event time field", rf"^{_FIELD}$", "event_time", invalid=("",)),
    "id_field": ParameterRule("Event ID field", rf"^({_FIELD})?$", "order_id", invalid=("a b",)),
    # windows
    "window": ParameterRule("Window size", rf"^{_POSITIVE_DURATION}$", "5m", invalid=("0m", "5", "banana")),
    "window_period": ParameterRule("Sliding window period", rf"^{_POSITIVE_DURATION}$", "1m",
                                   invalid=("1", "0s")),
    "allowed_lateness": ParameterRule("Allowed lateness", rf"^(0+|{_DURATION})$", "5m", invalid=("5", "-1m", "05")),
    "early_firing": ParameterRule("Early firing interval", r"^[0-9]*[1-9][0-9]*((s|m|h|d)|000ms)$", "10s",
                                  invalid=("0s", "10", "1500ms", "0000ms")),
    # aggregates
    "aggregate": ParameterRule(
        "Aggregates", rf"^{_AGGREGATE}(,{_AGGREGATE})*$", "count,sum:qty,max:price",
        invalid=("count,", "median:price", "sum")),
    # output
    "sink": ParameterRule(
        "Aggregate sink",
        rf"^(bigquery://[a-z][a-z0-9-]{{4,28}}[a-z0-9]\.[A-Za-z0-9_]{{1,1024}}\.[A-Za-z_][A-Za-z0-9_]{{0,62}}"
        rf"(\?method=(merge|cdc))?|{_POSTGRES_URL}|{_KAFKA_OUTPUT_URL})$",
        "bigquery://my-project.analytics.order_aggregates",
        invalid=("sqlite:///onceflow-output/aggregates.db", "bigquery://p.d.t", "file:///data/out"),
        required=True,
        note="On Dataflow the sink must be remote: bigquery://, postgresql:// or kafka:// "
             "(a sqlite or file sink would stay on one worker's disk)."),
    "dlq": ParameterRule(
        "Dead-letter queue", rf"^({_POSTGRES_URL}|{_KAFKA_OUTPUT_URL})$", "kafka://broker-1:9092/orders-dlq",
        invalid=("onceflow-output/dlq.jsonl", "kafka://broker-1/orders-dlq", "kafka://broker-1:9092/dlq?format=xml"),
        required=True,
        note="On Dataflow the dead-letter queue must be remote: postgresql://...?table=NAME or "
             "kafka://HOST:PORT/TOPIC (a JSON-lines file would stay on one worker's disk)."),
    "sink_batch_size": ParameterRule("Rows per sink transaction", r"^[0-9]*[1-9][0-9]*$", str(DEFAULT_BATCH_ROWS),
                                     invalid=("0", "-5", "many")),
    "shards": ParameterRule("Key shards of the aggregation", r"^[0-9]*[1-9][0-9]*$", "8",
                            invalid=("0", "-2", "all")),
    "kafka_readers": ParameterRule("Kafka readers", r"^[0-9]*[1-9][0-9]*$", "2", invalid=("0", "-1", "many")),
    # monitoring (local runs; on Dataflow, Dataflow's own monitoring shows the same metrics)
    "metrics_out": ParameterRule(
        "Metrics file", r"^\S+$", "/tmp/onceflow-metrics.json", invalid=("",),
        note="Written by the process that submits the job (for a Flex Template, the launcher VM)."),
    "status": ParameterRule("Live status line", r"^(auto|on|off)$", "off", invalid=("yes",)),
    "health_port": ParameterRule(
        "Health endpoint port", r"^([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$",
        "0", invalid=("-1", "http", "65536", "99999")),
    "health_max_lag": ParameterRule("Health: maximum consumer lag", r"^([0-9]+|none|off)$", "100000",
                                    invalid=("1e5", "-1")),
    "health_max_dlq_rate": ParameterRule(
        "Health: maximum dead-letter rate",
        r"^(0(\.[0-9]+)?|1(\.0+)?|\.[0-9]+|[0-9]{1,2}(\.[0-9]+)?%|100%|none|off)$", "0.05",
        invalid=("1.5", "-0.1", "101%")),
    "health_max_watermark_age": ParameterRule(
        "Health: maximum watermark age", rf"^([0-9]+(\.[0-9]+)?|{_DURATION}|none|off)$", "15m",
        invalid=("15 minutes", "-5m")),
    "health_max_sink_lag": ParameterRule(
        "Health: maximum sink lag", rf"^([0-9]+(\.[0-9]+)?|{_DURATION}|none|off)$", "30m",
        invalid=("30 minutes", "-5m")),
}

_SINGLE_LINE = r"^[^\r\n]*$"

# -- parameters from the options classes ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag as argparse sees it: ``name`` is the flag without ``--``."""

    name: str
    help: str
    default: object
    choices: Optional[Tuple[str, ...]]
    required: bool


def flags(option_classes: Iterable[type]) -> List[Flag]:
    """The flags the classes define, in definition order."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for cls in option_classes:
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    found = []
    for action in parser._actions:  # pylint: disable=protected-access
        long_names = [opt for opt in action.option_strings if opt.startswith("--")]
        if not long_names:
            continue
        found.append(Flag(
            name=long_names[0][2:],
            help=" ".join(str(action.help or "").split()),
            default=action.default,
            choices=tuple(str(c) for c in action.choices) if action.choices else None,
            required=bool(action.required),
        ))
    return found


def generic_flags(pipeline: TemplatePipeline) -> List[str]:
    """Flags of ``pipeline`` with no entry in :data:`RULES` (they get a generic one)."""
    return [flag.name for flag in flags(pipeline.option_classes) if flag.name not in RULES]


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def parameter(flag: Flag) -> Dict[str, object]:
    """One metadata parameter for a flag."""
    rule = RULES.get(flag.name)
    help_text = flag.help
    if rule is not None:
        if rule.note:
            help_text = f"{help_text} {rule.note}"
        help_text = f"{help_text} Example: {rule.example}"
        return {
            "name": flag.name,
            "label": rule.label,
            "helpText": help_text,
            "isOptional": not (rule.required or flag.required),
            "regexes": [rule.regex],
        }
    if flag.choices:
        regex = "^(" + "|".join(re.escape(choice) for choice in flag.choices) + ")$"
        help_text = f"{help_text} Example: {flag.choices[0]}"
    else:
        regex = _SINGLE_LINE
    return {
        "name": flag.name,
        "label": _label(flag.name),
        "helpText": help_text,
        "isOptional": not flag.required,
        "regexes": [regex],
    }


def metadata(pipeline: TemplatePipeline) -> Dict[str, object]:
    """The Flex Template metadata of ``pipeline``, as a JSON-ready dict."""
    return {
        "_comment": (f"Generated from {pipeline.module}'s PipelineOptions by `onceflow templates generate`; "
                     "do not edit."),
        "name": pipeline.title,
        "description": pipeline.description,
        "parameters": [parameter(flag) for flag in flags(pipeline.option_classes)],
    }


def metadata_text(pipeline: TemplatePipeline) -> str:
    return json.dumps(metadata(pipeline), indent=2, ensure_ascii=False) + "\n"


# -- the Dockerfile's pinned Beam version ---------------------------------------

_BEAM_ARG = re.compile(r"^ARG BEAM_VERSION=(\S*)$", re.MULTILINE)


class DockerfileError(ValueError):
    """The templates folder's Dockerfile cannot be read as text or has no
    ``ARG BEAM_VERSION=`` line; the message is one line naming its path."""


def dockerfile_beam_version(text: str) -> Optional[str]:
    """The default of ``ARG BEAM_VERSION`` in a Dockerfile's text, if any."""
    match = _BEAM_ARG.search(text)
    return match.group(1) if match else None


def pin_dockerfile(text: str, version: str = BEAM_VERSION, path: str = "templates/Dockerfile") -> str:
    """``text`` with ``ARG BEAM_VERSION=<version>``; :class:`DockerfileError` naming
    ``path`` (the file the text came from) if the line is missing."""
    if dockerfile_beam_version(text) is None:
        raise DockerfileError(f"{path} has no 'ARG BEAM_VERSION=...' line; add one, e.g. ARG BEAM_VERSION={version}")
    return _BEAM_ARG.sub(f"ARG BEAM_VERSION={version}", text, count=1)


# -- files ------------------------------------------------------------------------

DOCKERFILE = "Dockerfile"


def metadata_path(pipeline: TemplatePipeline) -> str:
    return f"{pipeline.name}/metadata.json"


def render(templates_dir: pathlib.Path,
           pipelines: Sequence[TemplatePipeline] = PIPELINES) -> Dict[str, str]:
    """Every generated file's expected text, keyed by its path under ``templates_dir``.
    The Dockerfile is read (only its BEAM_VERSION line is generated);
    :class:`DockerfileError` when it cannot be read as text or has no
    BEAM_VERSION line."""
    files = {metadata_path(pipeline): metadata_text(pipeline) for pipeline in pipelines}
    dockerfile = templates_dir / DOCKERFILE
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise DockerfileError(f"{dockerfile} is a folder, not a Dockerfile") from None
    except OSError as error:
        raise DockerfileError(f"cannot read {dockerfile}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DockerfileError(f"{dockerfile} is not UTF-8 text; is it the Dockerfile?") from None
    files[DOCKERFILE] = pin_dockerfile(text, path=str(dockerfile))
    return files


def stale(templates_dir: pathlib.Path,
          pipelines: Sequence[TemplatePipeline] = PIPELINES) -> List[str]:
    """Paths (relative to ``templates_dir``) whose content differs from :func:`render`
    (a file that is not UTF-8 text differs)."""
    out = []
    for relative, text in render(templates_dir, pipelines).items():
        path = templates_dir / relative
        if not path.exists() or _text_or_none(path) != text:
            out.append(relative)
    return out


def _text_or_none(path: pathlib.Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def write(templates_dir: pathlib.Path,
          pipelines: Sequence[TemplatePipeline] = PIPELINES) -> List[str]:
    """Writes the stale files; returns their paths relative to ``templates_dir``."""
    rendered = render(templates_dir, pipelines)
    changed = stale(templates_dir, pipelines)
    for relative in changed:
        path = templates_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered[relative], encoding="utf-8")
    return changed


def default_templates_dir() -> pathlib.Path:
    """``templates/`` next to the package in a source tree, else ``./templates``."""
    beside = pathlib.Path(__file__).resolve().parents[1] / "templates"
    if (beside / DOCKERFILE).exists():
        return beside
    return pathlib.Path.cwd() / "templates"


__all__ = [
    "DockerfileError",
    "PIPELINES",
    "RULES",
    "ParameterRule",
    "TemplatePipeline",
    "dockerfile_beam_version",
    "flags",
    "generic_flags",
    "metadata",
    "metadata_text",
    "render",
    "stale",
    "write",
]
