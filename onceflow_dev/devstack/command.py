"""``onceflow dev``: start, inspect and stop the local services.

    onceflow dev up     [--services kafka,postgres,prism,flink,flink-cluster]  (default kafka,postgres)
                        [--secure | --no-secure]   Kafka's SASL_SSL and mutual-TLS listeners
    onceflow dev status [--services ...] [--json]
    onceflow dev down   [--services ...]                          (default: all)
    onceflow dev topic create NAME --partitions N
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from onceflow_dev import devstack
from onceflow_dev.devstack import kafka

_SERVICES_HELP = (
    f"comma-separated, from {','.join(devstack.SERVICES)}"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dev`` and its subcommands to the ``onceflow`` parser."""
    dev = subparsers.add_parser(
        "dev",
        help="local Kafka, PostgreSQL, Prism and Flink for development and tests",
        description=(
            "Real local services under $ONCEFLOW_HOME (default ./.onceflow): a KRaft Kafka "
            "broker, a throwaway PostgreSQL cluster, the Prism runner binary and Beam's "
            "Flink job server."
        ),
    )
    dev.set_defaults(handler=lambda args: _print_help(dev))
    commands = dev.add_subparsers(dest="dev_command", metavar="SUBCOMMAND")

    up = commands.add_parser("up", help="start services (idempotent)")
    up.add_argument(
        "--services",
        default=",".join(devstack.DEFAULT_SERVICES),
        help=f"{_SERVICES_HELP} (default: {','.join(devstack.DEFAULT_SERVICES)})",
    )
    up.add_argument(
        "--secure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start Kafka with a SASL_SSL (SCRAM-SHA-512) and a mutual-TLS listener next to the plain "
             "one, with a throwaway CA and credentials ('dev status --json' shows them); "
             "--no-secure without; default: as Kafka's previous start (plain the first time)",
    )
    up.set_defaults(handler=_up)

    status = commands.add_parser("status", help="show whether each service is up and how to reach it")
    status.add_argument("--services", default=None, help=f"{_SERVICES_HELP} (default: all)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_status)

    down = commands.add_parser("down", help="stop services started from this folder")
    down.add_argument("--services", default=None, help=f"{_SERVICES_HELP} (default: all)")
    down.set_defaults(handler=_down)

    topic = commands.add_parser("topic", help="manage topics on the dev Kafka broker")
    topic_commands = topic.add_subparsers(dest="topic_command", metavar="ACTION")
    topic.set_defaults(handler=lambda args: _print_help(topic))
    create = topic_commands.add_parser("create", help="create a topic (no-op if it exists alike)")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, default=1, help="partition count (default 1)")
    create.add_argument(
        "--kafka_bootstrap_servers",
        default=None,
        help="broker to use (default: the dev broker, 127.0.0.1:$ONCEFLOW_KAFKA_PORT)",
    )
    create.set_defaults(handler=_topic_create)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


_NAME_WIDTH = max(len(name) for name in devstack.SERVICES)  # the services' names, in one column


def _describe(name: str, info: dict[str, Any]) -> str:
    """One human line about a service."""
    state = "up" if info.get("healthy") else "down"
    if name == "kafka":
        where = f"{info['bootstrap_servers']}  (Kafka {info['version']})"
    elif name == "postgres":
        where = info["dsn"]
        if info.get("server_version"):
            where += f"  (PostgreSQL {info['server_version']})"
    elif name == "prism":
        state = "ready" if info.get("healthy") else ("broken" if info.get("exists") else "not built")
        where = info["path"]
    elif name == "flink":
        where = (
            f"{info['job_endpoint']}  (Beam {info['job_server_beam_version']} job server, "
            f"Flink {info['flink_version']} at {info['flink_master']})"
        )
    elif name == "flink-cluster":
        where = f"{info['rest_url']}  (Flink {info['flink_version']}, {info['slots']} slots)"
    elif name == "kafka-expansion":
        where = f"{info['address']}  (Beam {info['beam_java_version']} Kafka expansion service)"
    else:  # pragma: no cover - every service is listed above
        where = ""
    pid = f"  pid {info['pid']}" if info.get("pid") else ""
    line = f"{name:<{_NAME_WIDTH}} {state:<10} {where}{pid}"
    secure = info.get("secure") if name == "kafka" else None
    if secure:  # the secured listeners, one line each
        for label, listener in (("SASL_SSL", secure), ("mutual TLS", secure["mtls"])):
            listener_state = "up" if listener["healthy"] else "down"
            line += (f"\n{'':<{_NAME_WIDTH}} {listener_state:<10} {listener['bootstrap_servers']}  ({label}; "
                     f"--kafka_config_file {listener['client_properties']})")
    return line


def _up(args: argparse.Namespace) -> int:
    names = devstack.parse_services(args.services)
    started = devstack.ensure_up(names, secure=args.secure)
    info = devstack.status(names)
    for name in names:
        print(_describe(name, info[name]))
    if not started:
        print(f"everything is already up: {', '.join(names)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    info = devstack.status(args.services)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        for name, service in info.items():
            print(_describe(name, service))
    # Exit 1 only when services were named and one is not healthy (scripts: a check).
    if args.services and not all(service["healthy"] for service in info.values()):
        return 1
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = devstack.down(args.services)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _topic_create(args: argparse.Namespace) -> int:
    created = kafka.create_topic(
        args.name, partitions=args.partitions, bootstrap=args.kafka_bootstrap_servers
    )
    verb = "created" if created else "already exists:"
    print(f"{verb} topic {args.name} ({args.partitions} partitions)")
    return 0
