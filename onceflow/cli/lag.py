"""``onceflow lag``: a consumer group's lag per partition and in total, from the broker.

    onceflow lag --bootstrap-server HOST:PORT --group GROUP [--topic T] [--max-lag N] [--json]
                 [--kafka_config_file PATH] [--kafka_setting NAME=VALUE ...]

Exit status: 0 (within --max-lag, or no --max-lag), 1 (total lag above --max-lag),
2 (a wrong flag), 3 (the broker cannot be reached or refused a request),
4 (no such consumer group or topic).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict

from onceflow.io.kafka.admin import consumer_group_lag
from onceflow.io.kafka.config import client_error_line, parse_client_settings, parse_kafka_url, read_properties_file
from onceflow.io.kafka.errors import BrokerUnreachable, UnknownGroupOrTopic
from onceflow.observability import lag as lag_module
from onceflow.windowing import parse_duration_ms

MAX_TIMEOUT_S = 3600.0  # a longer --timeout is refused: a probe waiting over an hour is a hang


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``lag`` to the ``onceflow`` parser."""
    parser = subparsers.add_parser(
        "lag",
        help="a consumer group's lag per partition, from the broker (for probes and alerts)",
        description=(
            "Per partition: the group's committed offset, the log end offset and the lag between "
            "them, and the total. A partition with no committed offset counts from the log start "
            "offset (lag = end - start). Exit status: 0 ok, 1 total lag above --max-lag, "
            "2 wrong flags, 3 broker unreachable, 4 unknown group or topic."
        ),
    )
    parser.add_argument("--bootstrap-server", required=True, metavar="HOST:PORT", type=_bootstrap_servers,
                        help="the Kafka broker(s), comma-separated")
    parser.add_argument("--group", required=True, type=_group, help="the consumer group, e.g. onceflow-aggregate")
    parser.add_argument("--topic", default=None,
                        help="one topic, every partition of it (default: every topic the group has "
                             "committed offsets for)")
    parser.add_argument("--max-lag", type=_non_negative_int, default=None, metavar="N",
                        help="exit with status 1 when the total lag is above N records")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=_timeout_seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for the broker: seconds above 0, or a duration such as 500ms "
                             f"or 2m; at most {MAX_TIMEOUT_S:.0f} (default 10)")
    parser.add_argument("--kafka_setting", action="append", default=None, metavar="NAME=VALUE",
                        help="a client setting passed as is (repeatable), e.g. security.protocol=SASL_SSL")
    parser.add_argument("--kafka_config_file", metavar="PATH",
                        help="a Kafka client properties file (key=value lines, librdkafka names), as the "
                             "job's --kafka_config_file; --kafka_setting wins")
    parser.set_defaults(handler=run_lag)


def _non_negative_int(text: str) -> int:
    if not str(text).strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of records")
    return int(text)


def _bootstrap_servers(text: str) -> str:
    """``HOST:PORT[,HOST:PORT...]``, checked as the job checks the brokers of its
    kafka:// URLs (:func:`parse_kafka_url`); ArgumentTypeError otherwise."""
    try:
        # "lag" is only a topic name for the URL check; the brokers are what is checked.
        return parse_kafka_url(f"kafka://{text}/lag").bootstrap_servers
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (comma-separated for several brokers), e.g. 127.0.0.1:9092") from None


def _group(text: str) -> str:
    """A consumer group name; an empty one is refused (Kafka has none)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the job's consumer group, e.g. --group=onceflow-aggregate")
    return text


def _timeout_seconds(text: str) -> float:
    """Seconds above 0 and at most :data:`MAX_TIMEOUT_S`, from a number (``10``,
    ``2.5``) or a duration with a unit (``500ms``, ``2m``); ArgumentTypeError
    otherwise. (The client takes 0 as "do not wait" and a negative timeout as
    "wait forever".)"""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration_ms(text) / 1000
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds; e.g. --timeout=10 or --timeout=500ms") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds above 0, e.g. --timeout=10")
    if seconds > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {MAX_TIMEOUT_S:.0f} seconds (an hour); give at most --timeout={MAX_TIMEOUT_S:.0f}")
    return seconds


def _check_no_other_broker_or_group(settings: Dict[str, str], args: argparse.Namespace) -> None:
    """ValueError for a client setting naming other brokers or another group than
    the flags: the flags win, and the lag would be of something not asked for."""
    flags = {"bootstrap.servers": ("--bootstrap-server", args.bootstrap_server), "group.id": ("--group", args.group)}
    for name, value in settings.items():
        flag = flags.get(name.strip().lower())
        if flag is not None and value.strip() != flag[1]:
            raise ValueError(f"the client setting {name}={value} is not {flag[0]} {flag[1]}: give it with "
                             f"{flag[0]} alone")


def run_lag(args: argparse.Namespace) -> int:
    try:
        settings = read_properties_file(args.kafka_config_file) if args.kafka_config_file else {}
        settings.update(parse_client_settings(args.kafka_setting, "--kafka_setting"))
        _check_no_other_broker_or_group(settings, args)
    except ValueError as error:
        print(f"onceflow lag: error: {error}", file=sys.stderr)
        return 2
    from confluent_kafka import KafkaException  # the kafka extra, as consumer_group_lag needs

    try:
        found = consumer_group_lag(args.bootstrap_server, args.group, args.topic, timeout_s=args.timeout,
                                   settings=settings)
    except KafkaException as error:  # the client refused a setting; the broker's errors are the two below
        print(f"onceflow lag: error: {client_error_line(error, settings)}", file=sys.stderr)
        return 2
    except UnknownGroupOrTopic as error:
        print(f"onceflow lag: {error}", file=sys.stderr)
        return lag_module.EXIT_UNKNOWN
    except BrokerUnreachable as error:
        print(f"onceflow lag: {error}", file=sys.stderr)
        return lag_module.EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(lag_module.to_json(found, args.max_lag), sort_keys=True))
    else:
        print(lag_module.render(found, args.max_lag))
    return lag_module.exit_status(found, args.max_lag)
