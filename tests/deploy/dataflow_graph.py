"""Build the aggregate pipeline for Dataflow without submitting it.

    python dataflow_graph.py OUT_DIR [pipeline flags]     # run by path, from any folder

Builds the graph with ``job_from_options`` + ``build`` under DataflowRunner
options, translates it as DataflowRunner does up to the network boundary, and
writes to OUT_DIR:

* ``pipeline.pb``: the portable pipeline proto (what Dataflow stages and runs);
* ``summary.json``: step labels, environments, and how far the translation went:
  ``"dataflow_job"`` when ``apache-beam[gcp]`` is installed (DataflowRunner itself
  builds the job with ``--dry_run=True``, then the job's ``Environment`` is filled
  in offline, as ``create_job_description`` would after staging), else
  ``"runner_api"`` (the same graph surgery DataflowRunner.run_pipeline does before
  it needs the Dataflow client: its visitors and overrides, a Docker default
  environment, ``validate_pipeline_graph``);
* ``job.json`` in ``dataflow_job`` mode: the Dataflow job description.

``unpickle(path)`` (run in a fresh interpreter, like a worker) loads every
pickled DoFn, CombineFn and window function in ``pipeline.pb``.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Dict, List

TOP_LEVEL = ("ReadFiles", "ReadKafka", "AggregateEvents", "WriteRows", "WriteDeadLetters", "KeepPositions")


def build_for_dataflow(argv: List[str]):
    import apache_beam as beam

    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import build, job_from_options

    if _has_gcp():  # before validation: with --dry_run the options skip their GCS checks
        argv = [*argv, "--dry_run=True"]
    options = parse_pipeline_args(argv)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job_from_options(options))
    return pipeline, options


def _has_gcp() -> bool:
    try:
        from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401
    except ImportError:
        return False
    return True


def translate(pipeline, options) -> Dict[str, Any]:
    """The portable proto and, where the SDK allows, the Dataflow job description."""
    from apache_beam.options.pipeline_options import TestOptions, WorkerOptions
    from apache_beam.runners.pipeline_utils import validate_pipeline_graph

    if _has_gcp():
        from apache_beam.runners.dataflow.internal import apiclient

        assert options.view_as(TestOptions).dry_run
        result = pipeline.run()
        job = result.job  # apiclient.Job: validate_pipeline_graph ran in its constructor
        proto = job.proto_pipeline
        apiclient.DataflowApplicationClient._apply_sdk_environment_overrides(  # pylint: disable=protected-access
            proto, {}, options)
        job.proto.environment = apiclient.Environment(
            packages=[], options=options, environment_version="offline",
            proto_pipeline_staged_url=f"{job.google_cloud_options.staging_location}/pipeline.pb",
            proto_pipeline=proto).proto
        return {"mode": "dataflow_job", "proto": proto, "job_json": job.json()}

    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
    from apache_beam.runners.dataflow.ptransform_overrides import get_dataflow_transform_overrides
    from apache_beam.transforms import environments

    runner = DataflowRunner()
    pipeline.visit(runner.combinefn_visitor())
    pipeline.visit(runner.side_input_visitor(deterministic_key_coders=True))
    pipeline.replace_all(DataflowRunner._PTRANSFORM_OVERRIDES)  # pylint: disable=protected-access
    overrides = get_dataflow_transform_overrides(options)
    if overrides:
        pipeline.replace_all(overrides)
    runner._adjust_pipeline_for_dataflow_v2(pipeline)  # pylint: disable=protected-access
    image = options.view_as(WorkerOptions).sdk_container_image
    environment = environments.DockerEnvironment.from_container_image(
        image, resource_hints=environments.resource_hints_from_options(options))
    proto = pipeline.to_runner_api(default_environment=environment)
    validate_pipeline_graph(proto)
    return {"mode": "runner_api", "proto": proto}


def summarize(proto) -> Dict[str, Any]:
    transforms = proto.components.transforms
    roots = [transforms[t] for t in proto.root_transform_ids]
    top = [transforms[sub].unique_name for root in roots for sub in root.subtransforms] or \
        [root.unique_name for root in roots]
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    images = sorted({
        beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        for env in proto.components.environments.values() if env.urn == common_urns.environments.DOCKER.urn
    })
    unbounded = sorted(
        transforms[producer].unique_name
        for producer in transforms
        for pcoll in transforms[producer].outputs.values()
        if not transforms[producer].subtransforms
        and proto.components.pcollections[pcoll].is_bounded == beam_runner_api_pb2.IsBounded.UNBOUNDED
    )
    return {
        "top_level": top,
        "all": sorted(t.unique_name for t in transforms.values()),
        "container_images": images,
        "unbounded_outputs": unbounded,
        "environment_urns": sorted({env.urn for env in proto.components.environments.values()}),
    }


def unpickle(path: str) -> Dict[str, int]:
    """Loads every pickled function in the proto; returns counts by kind."""
    from apache_beam.internal import pickler
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    proto = beam_runner_api_pb2.Pipeline.FromString(pathlib.Path(path).read_bytes())
    counts = {"dofn": 0, "combinefn": 0, "windowfn": 0}
    combine_urns = {common_urns.composites.COMBINE_PER_KEY.urn, common_urns.composites.COMBINE_GLOBALLY.urn,
                    common_urns.combine_components.COMBINE_PER_KEY_PRECOMBINE.urn,
                    common_urns.combine_components.COMBINE_PER_KEY_MERGE_ACCUMULATORS.urn,
                    common_urns.combine_components.COMBINE_PER_KEY_EXTRACT_OUTPUTS.urn,
                    common_urns.combine_components.COMBINE_GROUPED_VALUES.urn}
    for transform in proto.components.transforms.values():
        urn = transform.spec.urn
        if urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if payload.do_fn.urn == "beam:dofn:pickled_python_info:v1":
                pickler.loads(payload.do_fn.payload)
                counts["dofn"] += 1
        elif urn in combine_urns:
            payload = beam_runner_api_pb2.CombinePayload.FromString(transform.spec.payload)
            pickler.loads(payload.combine_fn.payload)
            counts["combinefn"] += 1
    for strategy in proto.components.windowing_strategies.values():
        if strategy.window_fn.urn == "beam:window_fn:pickled_python:v1":
            pickler.loads(strategy.window_fn.payload)
            counts["windowfn"] += 1
    return counts


def main(argv: List[str]) -> int:
    out = pathlib.Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    pipeline, options = build_for_dataflow(argv[1:])
    translated = translate(pipeline, options)
    proto = translated["proto"]
    (out / "pipeline.pb").write_bytes(proto.SerializeToString())
    summary = {"mode": translated["mode"], **summarize(proto)}
    if "job_json" in translated:
        (out / "job.json").write_text(translated["job_json"], encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--unpickle"]:
        print(json.dumps(unpickle(sys.argv[2])))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
