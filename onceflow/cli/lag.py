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
import sys

from onceflow.io.kafka.admin import consumer_group_lag
from onceflow.io.kafka.config import parse_client_settings, read_properties_file
from onceflow.io.kafka.errors import BrokerUnreachable, UnknownGroupOrTopic
from onceflow.observability import lag as lag_module


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
    parser.add_argument("--bootstrap-server", required=True, metavar="HOST:PORT",
                        help="the Kafka broker(s), comma-separated")
    parser.add_argument("--group", required=True, help="the consumer group, e.g. onceflow-aggregate")
    parser.add_argument("--topic", default=None,
                        help="one topic, every partition of it (default: every topic the group has "
                             "committed offsets for)")
    parser.add_argument("--max-lag", type=_non_negative_int, default=None, metavar="N",
                        help="exit with status 1 when the total lag is above N records")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the broker (default 10)")
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


def run_lag(args: argparse.Namespace) -> int:
    try:
        settings = read_properties_file(args.kafka_config_file) if args.kafka_config_file else {}
        settings.update(parse_client_settings(args.kafka_setting, "--kafka_setting"))
    except ValueError as error:
        print(f"onceflow lag: error: {error}", file=sys.stderr)
        return 2
    try:
        found = consumer_group_lag(args.bootstrap_server, args.group, args.topic, timeout_s=args.timeout,
                                   settings=settings)
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
