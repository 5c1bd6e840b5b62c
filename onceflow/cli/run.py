"""``onceflow run JOB [flags]``: the pipelines as subcommands.

    onceflow run aggregate --input=kafka://127.0.0.1:19092/orders --kafka_group=g ...
    onceflow run archive --input=kafka://... --output=DIR ...

Every flag after the job's name goes to the job as it is (``--help`` too); the
job runs in this process and its exit status is the command's.
``python -m onceflow.pipelines.aggregate`` (for ``--setup_file`` users and the
Flex Templates) runs the same code.
"""

from __future__ import annotations

import argparse
import importlib

# The jobs by name: the module whose main(argv) runs it, and one line for --help.
JOBS = {
    "aggregate": ("onceflow.pipelines.aggregate", "raw events to windowed aggregates, upserted idempotently"),
    "archive": ("onceflow.pipelines.archive", "a Kafka topic's records to an archive folder, for replays"),
}


def register(subparsers: argparse._SubParsersAction) -> None:  # pylint: disable=protected-access
    """Adds ``run`` with one sub-parser per job to the ``onceflow`` parser."""
    run = subparsers.add_parser("run", help="run a pipeline: aggregate (the main job) or archive",
                                description="Runs a pipeline in this process; every flag after its name goes to "
                                            "it (see `onceflow run JOB --help`).")
    jobs = run.add_subparsers(dest="job", metavar="JOB")
    for name, (_, summary) in JOBS.items():
        job = jobs.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        job.add_argument("job_args", nargs=argparse.REMAINDER)
        job.set_defaults(handler=lambda args, job_name=name: _run(job_name, args.job_args))
    run.set_defaults(handler=lambda _args: _usage(run))


def _run(name: str, argv: list) -> int:
    return importlib.import_module(JOBS[name][0]).main(list(argv), prog=f"onceflow run {name}")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
