"""What each runner needs from a job, in one place.

Every workaround here names the runner and version it is for and why; the main
job applies them all through :func:`prepare_runner`. Findings behind them:
docs/runner-findings.md.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from onceflow.errors import UsageError
from onceflow.versions import BEAM_VERSION

if TYPE_CHECKING:  # apache_beam is imported where it is used: `onceflow dev` reads the paths below without it
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner


def onceflow_home() -> pathlib.Path:
    """The project-local folder of the dev services and their builds:
    ``$ONCEFLOW_HOME`` if set, else ``./.onceflow``."""
    configured = os.environ.get("ONCEFLOW_HOME")
    path = pathlib.Path(configured) if configured else pathlib.Path.cwd() / ".onceflow"
    return path.resolve()


def prism_binary_path() -> pathlib.Path:
    """Where ``onceflow dev up --services prism`` builds Prism for BEAM_VERSION."""
    return onceflow_home() / "cache" / f"prism-{BEAM_VERSION}" / "bin" / "prism"


def built_prism() -> Optional[str]:
    """The path of the built Prism binary, or None when it has not been built."""
    path = prism_binary_path()
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def runs_on_prism(options: PipelineOptions) -> bool:
    """Whether ``--runner`` names Prism."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    return runner is not None and runner.lower() in ("prismrunner", "prism")


def runs_on_flink(options: PipelineOptions) -> bool:
    """Whether ``--runner`` can be Flink: FlinkRunner, or PortableRunner (a job
    server: Flink's, for Flink's flags to mean anything)."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = (options.view_as(StandardOptions).runner or "").lower()
    if runner and not runner.endswith("runner"):
        runner += "runner"
    return runner.rsplit(".", 1)[-1] in ("flinkrunner", "portablerunner")


def choose_streaming_runner(options: PipelineOptions) -> None:
    """A live read needs a streaming runner. With no ``--runner``, use the Prism
    that ``onceflow dev up --services prism`` built: Beam 2.77's DirectRunner
    would silently run a live read in batch mode and never emit a window."""
    from apache_beam.options.pipeline_options import PrismRunnerOptions, StandardOptions

    standard = options.view_as(StandardOptions)
    standard.streaming = True
    if standard.runner is not None:
        return

    prism = options.view_as(PrismRunnerOptions)
    location = prism.prism_location or built_prism()
    if location is None:
        raise UsageError(f"a live kafka:// read needs a streaming runner and no Prism is built in {onceflow_home()}: "
                         "run `onceflow dev up --services prism` (builds Prism there), or set ONCEFLOW_HOME to the "
                         ".onceflow folder where it ran, or pass --runner=PrismRunner --prism_location=PATH, or "
                         "another runner")
    standard.runner = "PrismRunner"
    prism.prism_location = location


def use_built_prism(options: PipelineOptions) -> None:
    """``--runner=PrismRunner`` without ``--prism_location`` runs the Prism that
    ``onceflow dev up --services prism`` built, when there is one: Beam would
    download its own from GitHub (a traceback where that cannot be reached)."""
    from apache_beam.options.pipeline_options import PrismRunnerOptions

    prism = options.view_as(PrismRunnerOptions)
    if runs_on_prism(options) and not prism.prism_location:
        prism.prism_location = built_prism()


# Beam's portable client (Prism, job servers) opens a job's state and message
# streams with --job_server_timeout as their deadline, 300 s by default: a live
# job then fails after five minutes with DEADLINE_EXCEEDED ("Stream removed").
# Found by the long torture run. A live job gets ten years unless the flag is set.
LIVE_JOB_SERVER_TIMEOUT_S = 10 * 365 * 24 * 3600


def keep_live_job_streams_open(options: PipelineOptions) -> None:
    """Raises ``--job_server_timeout`` for a live job unless set to another value
    than Beam's default (see above)."""
    from apache_beam.options.pipeline_options import PortableOptions

    if "job_server_timeout" not in options.get_all_options(drop_default=True):
        options.view_as(PortableOptions).job_server_timeout = LIVE_JOB_SERVER_TIMEOUT_S


# Prism 2.77 splits a slow bundle at an element and hands the rest to a new bundle,
# releasing the rest's keys although the first bundle may still hold (unwritten)
# state of the same key (engine/elementmanager.go, stageState.splitBundle): two
# bundles then update one key's state at once and one update is lost, with no
# error. In a torture of this job it dropped a few events from a window in about
# one backlog start in three. Runner-initiated splits are off for every stage
# with this experiment; the Kafka reader still checkpoints itself.
PRISM_NO_SPLITS_EXPERIMENT = "prism_disable_sdf_split"


def keep_prism_from_splitting(options: PipelineOptions) -> None:
    """On Prism, turns runner-initiated bundle splits off (see above): the
    stateful dedup and aggregation steps are only exact without them."""
    from apache_beam.options.pipeline_options import DebugOptions

    if not runs_on_prism(options):
        return
    debug = options.view_as(DebugOptions)
    if not debug.lookup_experiment(PRISM_NO_SPLITS_EXPERIMENT):
        debug.add_experiment(PRISM_NO_SPLITS_EXPERIMENT)


# Beam's Flink runner closes a bundle after --max_bundle_time_mills (1,000 ms by
# default), and a live job's panes (timers) and stored positions move only between
# bundles: the 1,000,000-order backlog of the benchmark caught up in about 45 s with
# 1,000 ms, 22 s with 100 ms (50 ms: 25.5 s), exact each, and passed the torture's
# kills (docs/benchmarks.md, docs/deploying.md).
LIVE_FLINK_BUNDLE_TIME_MS = 100


def shorten_flink_bundles(options: PipelineOptions) -> None:
    """Sets ``--max_bundle_time_mills`` to LIVE_FLINK_BUNDLE_TIME_MS for a live job that
    can run on Flink, unless the flag is given."""
    from onceflow.options import FlinkOptions

    flink = options.view_as(FlinkOptions)
    if flink.max_bundle_time_mills is not None and flink.max_bundle_time_mills < 1:
        raise UsageError(f"--max_bundle_time_mills: {flink.max_bundle_time_mills} is not a positive number of "
                         f"milliseconds; try {LIVE_FLINK_BUNDLE_TIME_MS}")
    if runs_on_flink(options) and flink.max_bundle_time_mills is None:
        flink.max_bundle_time_mills = LIVE_FLINK_BUNDLE_TIME_MS


# Beam's LOOPBACK environment runs a job's SDK workers as threads of the job's own
# process: all of its Python work shares one interpreter lock, so a live job on Flink
# used one core (the catch-up of the benchmark's 1,000,000 orders: the job process at
# 100 % of a core, Flink at 20 %). With Beam's use_loopback_process_worker experiment
# the workers are processes, --sdk_worker_parallelism of them, started as
# `python -c ...` (the name `python` looked up on PATH); Flink hands each step's
# instances to them in turn. Measured on 2 cores with two processes, --parallelism=2
# and --kafka_readers=2: from no gain to 17 % less catch-up time, with the machine's
# load (Flink's JVM needs the second core too; docs/benchmarks.md), so it is opt-in.
# A worker process outlives a job process killed alone and would go on running the
# job's steps: onceflow's workers exit when the job's process ends
# (:func:`exit_with_job_process`).
USE_LOOPBACK_PROCESS_WORKER = "use_loopback_process_worker"
JOB_PROCESS_ENV = "ONCEFLOW_JOB_PROCESS"  # the pid of the job process whose workers these are


def run_loopback_workers_in_processes(options: PipelineOptions) -> None:
    """Applies ``--loopback_worker_processes`` (see above), or refuses it in one line
    where it cannot work."""
    from apache_beam.options.pipeline_options import DebugOptions, PortableOptions

    from onceflow.options import FlinkOptions

    processes = options.view_as(FlinkOptions).loopback_worker_processes
    if processes is None:
        return
    if processes < 1:
        raise UsageError(f"--loopback_worker_processes: {processes} is not a positive number of processes; try 2")
    portable = options.view_as(PortableOptions)
    if not runs_on_flink(options) or (portable.environment_type or "").upper() != "LOOPBACK":
        raise UsageError("--loopback_worker_processes needs a job on Flink with --environment_type=LOOPBACK "
                         "(workers elsewhere are started by the runner)")
    if processes == 1:
        return
    here = os.path.dirname(sys.executable)
    beside = os.path.join(here, "python")
    if not (os.access(beside, os.X_OK) and os.path.samefile(beside, sys.executable)):
        raise UsageError(f"--loopback_worker_processes: Beam starts worker processes as `python`, and there is "
                         f"none beside this interpreter ({sys.executable}); run the job from a virtualenv, or "
                         "leave the flag out")
    os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    os.environ[JOB_PROCESS_ENV] = str(os.getpid())
    debug = options.view_as(DebugOptions)
    if not debug.lookup_experiment(USE_LOOPBACK_PROCESS_WORKER):
        debug.add_experiment(USE_LOOPBACK_PROCESS_WORKER)
    portable.sdk_worker_parallelism = processes


def exit_with_job_process() -> None:
    """In a LOOPBACK worker process started for ``--loopback_worker_processes``: a
    daemon thread that ends this process once the job's process has ended (this
    process is then re-parented). Elsewhere, and when called again, nothing."""
    global _watching
    job_process = os.environ.get(JOB_PROCESS_ENV, "")
    if not job_process.isdigit() or int(job_process) == os.getpid() or _watching:
        return
    if os.getppid() != int(job_process):
        return  # not a worker the job process started (a grandchild, or already orphaned)
    _watching = True

    def watch() -> None:
        while os.getppid() == int(job_process):
            time.sleep(1.0)
        os._exit(3)  # the job process is gone: stop running its steps

    threading.Thread(target=watch, name="onceflow-exit-with-job", daemon=True).start()


_watching = False  # whether this process watches its job process already


# A live job on Prism, or on Flink with one LOOPBACK worker, runs every Python step in
# one SDK worker process, and each state key (a shard's window) costs it round trips
# and timers: the 1,000,000-order catch-up took 15.7 s on Prism with 2 shards, 15.6 s
# with 1, about 21 s with 8 and 25.4 s with 16; on the dev Flink job server 21.4-29.8 s
# with 2 against 27.4-41.5 s with 8, faster in each of five interleaved pairs
# (docs/benchmarks.md). A live job on Flink gets at least one shard per task slot
# (--parallelism), so that each window's state can spread over them all. Backfills and
# other runners keep the transforms' default: there the number of shards did not
# change the speed, and Dataflow spreads them over workers.
LIVE_SHARDS = 2


# The Python SDK's worker threads and data plane, whose streams the runner closes
# when a job is cancelled (LOOPBACK runs them in the job's process).
_WORKER_LOGGERS = ("apache_beam.runners.worker.data_plane", "apache_beam.runners.worker.sdk_worker")


_QUIETED = False  # quiet_worker_teardown has run in this process


def is_hang_up(error: Optional[BaseException]) -> bool:
    """Whether ``error`` is a gRPC stream the other side closed: ``CANCELLED`` or
    ``UNAVAILABLE``."""
    import grpc

    return isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)) and error.code() in (
        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def _keep_thread_exceptions(keep: Callable[[threading.ExceptHookArgs], bool]) -> None:
    """From now on a thread's uncaught exception is printed (by the hook set
    before) only when ``keep`` says so."""
    previous = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if keep(args):
            previous(args)

    threading.excepthook = excepthook


def quiet_worker_teardown() -> None:
    """Keeps the runner's hang-up of a job being stopped from printing tracebacks.

    When a live job is cancelled (Ctrl-C, SIGTERM, a failed savepoint), or the
    runner goes away, Prism and Beam's Flink job server close the SDK worker's
    gRPC streams; with LOOPBACK the worker's threads run in this process and each
    prints the closed stream (``CANCELLED``, ``UNAVAILABLE``) as a traceback,
    between onceflow's one-line messages. Call this once the job runs (the job's
    own wait for the runner reports a runner gone, in one line): from then on
    those two errors, and only those, are dropped from worker threads' uncaught
    exceptions and from the worker's logs. Anything else still prints. Calls
    after the first do nothing.
    """
    import logging

    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    _keep_thread_exceptions(lambda args: not is_hang_up(args.exc_value))

    def keep(record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_hang_up(record.exc_info[1]))

    for name in _WORKER_LOGGERS:
        logging.getLogger(name).addFilter(keep)


class _MainThreadOnly:
    """A text stream that passes on what the main thread writes and drops what
    other threads write."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_SILENCED = False  # silence_worker_threads has run in this process


def silence_worker_threads() -> None:
    """Once the runner has reported the job failed: drops what other threads
    than the main one still print, log or raise uncaught. With LOOPBACK the SDK
    worker's threads run in the job's process; a timer still firing when the
    runner shut down fails on the closed state channel (a bare ``RuntimeError``
    from Beam's ``_blocking_request``, printed and logged with its traceback)
    after the job's own one-line error. The failure itself has reached the main
    thread, which reports it; the worker's first traceback, printed when the
    step failed, came before. The process's own stderr only: a stream put in its
    place (a test's capture) is left as it is. Calls after the first do nothing."""
    import logging

    global _SILENCED
    if _SILENCED:
        return
    _SILENCED = True
    _keep_thread_exceptions(lambda args: args.thread is threading.main_thread())

    def from_main_thread(record: logging.LogRecord) -> bool:
        return record.thread == threading.main_thread().ident

    for handler in logging.getLogger().handlers:
        handler.addFilter(from_main_thread)
    if sys.stderr is sys.__stderr__ and sys.stderr is not None:
        sys.stderr = _MainThreadOnly(sys.stderr)


_ONE_LINE_ERRORS: Tuple[type, ...] = ()  # the worker errors the job reports itself, in one line
_ONE_LINE_STEPS: Tuple[str, ...] = ()  # and the steps whose errors it reports so


def quiet_worker_errors_reported_in_one_line(kinds: Tuple[type, ...] = (), steps: Tuple[str, ...] = ()) -> None:
    """Keeps Beam from logging, with its traceback, a worker's error of one of
    ``kinds`` or raised in a step named ``steps`` (or a step inside one of them):
    the DirectRunner's workers log it before the job fails, and the job reports
    those itself, in one line. Anything else still prints."""
    import logging

    global _ONE_LINE_ERRORS, _ONE_LINE_STEPS
    first = not (_ONE_LINE_ERRORS or _ONE_LINE_STEPS)
    _ONE_LINE_ERRORS += tuple(kind for kind in kinds if kind not in _ONE_LINE_ERRORS)
    _ONE_LINE_STEPS += tuple(step for step in steps if step not in _ONE_LINE_STEPS)
    if not first:
        return

    def keep(record: logging.LogRecord) -> bool:
        if not record.exc_info and record.levelno < logging.ERROR:
            return True
        if record.exc_info and isinstance(record.exc_info[1], _ONE_LINE_ERRORS):
            return False
        message = record.getMessage()
        if record.exc_info and any(f"[while running '{step}" in message for step in _ONE_LINE_STEPS):
            return False
        # Portable runners pass the worker's traceback on as text: Prism logs it on
        # each bundle and job failure, Beam's client once more.
        return not (record.levelno >= logging.ERROR and any(f"{kind.__name__}: " in message
                                                            for kind in _ONE_LINE_ERRORS))

    for name in ("apache_beam.runners.common", *_WORKER_LOGGERS):
        logging.getLogger(name).addFilter(keep)
    for handler in logging.getLogger().handlers:  # Prism's log lines reach them from Beam's own loggers
        handler.addFilter(keep)


def default_shards(options: PipelineOptions, live: bool) -> int:
    """``--shards`` when not given: LIVE_SHARDS for a job that runs on Prism (named by
    ``--runner``, or chosen for a live job without one); for a live job on Flink,
    LIVE_SHARDS or ``--parallelism`` if that is more; else the transforms' default."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, StandardOptions

    from onceflow.transforms.batched import DEFAULT_SHARDS

    if runs_on_prism(options) or (live and options.view_as(StandardOptions).runner is None):
        return LIVE_SHARDS
    if live and runs_on_flink(options):
        return max(LIVE_SHARDS, options.view_as(FlinkRunnerOptions).parallelism or 0)
    return DEFAULT_SHARDS


def _runs_direct_multi_processing(options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import DirectOptions

    return options.view_as(DirectOptions).direct_running_mode == "multi_processing"


# Beam 2.77's DirectRunner first tries Prism for a batch pipeline: it starts a worker
# pool and fetches Prism's binary from GitHub. Where that is refused (here) it falls
# back to the FnApiRunner 0.34 s later; where it succeeds, a backfill downloads Prism
# on its first run and runs there, slower than on the FnApiRunner (1,000,000 orders from
# a file: 15.1 s against 11.4 s, one run each). A backfill with no --runner (or
# --runner=DirectRunner) therefore runs on the FnApiRunner the DirectRunner would fall
# back to, built as it builds it, on every machine.
def local_batch_runner(options: PipelineOptions, live: bool) -> Optional[FnApiRunner]:
    """Beam's FnApiRunner for a bounded job whose runner is the DirectRunner (named
    or the default); None otherwise (the runner the options name is used)."""
    from apache_beam.options.pipeline_options import StandardOptions

    standard = options.view_as(StandardOptions)
    if live or standard.streaming or (standard.runner or "DirectRunner").lower() not in ("directrunner", "direct"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _check_direct_workers(options: PipelineOptions) -> None:
    """A negative ``--direct_num_workers`` failed inside Beam's FnApiRunner with a
    traceback (``IndexError``)."""
    from apache_beam.options.pipeline_options import DirectOptions

    workers = options.view_as(DirectOptions).direct_num_workers
    if workers is not None and workers < 0:
        raise UsageError(f"--direct_num_workers: {workers} is not a number of workers; give 1 or more "
                         "(0: one per core)")


def prepare_runner(options: PipelineOptions, live: bool, reads_kafka: bool, kafka_readers: int) -> None:
    """Applies every workaround a job needs on the runner its options name, and
    refuses, in one line, the combinations that lose records:

    * a live job gets a streaming runner and long-lived job streams, and on Flink
      short bundles;
    * Prism 2.77 gets no runner-initiated splits;
    * the DirectRunner's ``multi_processing`` mode drops the residual of every
      bundle that checkpoints (Beam's ``ParallelBundleManager`` keeps only the
      workers' metrics and errors), so the Kafka reader's records after its first
      bundle were lost: refused for a Kafka input;
    * Prism 2.77 takes a reader stage's watermark from the latest bundle's readers
      only, so with several Kafka readers it could close windows early: refused.
    """
    if live:
        choose_streaming_runner(options)
        keep_live_job_streams_open(options)
        shorten_flink_bundles(options)
    use_built_prism(options)
    keep_prism_from_splitting(options)
    run_loopback_workers_in_processes(options)
    _check_direct_workers(options)
    if reads_kafka and _runs_direct_multi_processing(options):
        raise UsageError("--direct_running_mode=multi_processing: the DirectRunner's worker processes drop "
                         "the rest of a Kafka read after its first bundle (Beam 2.77); run a Kafka input "
                         "in_memory (the default) or on Flink")
    if kafka_readers > 1 and runs_on_prism(options):
        raise UsageError("--kafka_readers: Prism (Beam 2.77) takes a reader stage's watermark from the latest "
                         "bundle's readers only and could close windows early with several; use 1 on Prism, "
                         "or more on Flink or Dataflow")
