"""A live job being stopped keeps the runner's hang-up of its workers quiet, and a
failed job its workers' teardown."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, socket, threading
    import grpc
    from onceflow.runners import quiet_worker_teardown

    # A port that takes connections and never answers: a call there waits, so
    # cancelling it gives CANCELLED (on port 1, where nobody listens, the refused
    # connection could come first: UNAVAILABLE, as a loaded CI machine showed).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()

    def hang_up(cancel):
        # Real errors of a closed stream: a call cancelled (CANCELLED), a port
        # nobody listens on (UNAVAILABLE).
        address = f"127.0.0.1:{silent.getsockname()[1]}" if cancel else "127.0.0.1:1"
        channel = grpc.insecure_channel(address)
        call = channel.unary_stream("/beam.Fn/Control")(b"", timeout=5)
        if cancel:
            call.cancel()
        try:
            next(call)
        except grpc.RpcError as error:
            return error

    def raise_in_thread(error, name):
        def run():
            raise error
        thread = threading.Thread(target=run, name=name)
        thread.start()
        thread.join()

    logging.basicConfig()
    data_plane = logging.getLogger("apache_beam.runners.worker.data_plane")
    quiet_worker_teardown()
    for cancel in (True, False):
        error = hang_up(cancel)
        print("code", error.code().name, flush=True)
        raise_in_thread(error, "run_worker_1-1")
        data_plane.error("Failed to read inputs in the data plane.", exc_info=error)
    raise_in_thread(ValueError("a real fault"), "read_grpc_client_inputs")
    data_plane.error("another fault", exc_info=ValueError("a logged fault"))
""")


def test_a_stopped_jobs_closed_worker_streams_print_nothing_and_other_faults_still_do():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["code", "CANCELLED", "code", "UNAVAILABLE"]
    assert "_MultiThreadedRendezvous" not in done.stderr and "Failed to read inputs" not in done.stderr
    assert "Exception in thread read_grpc_client_inputs" in done.stderr and "ValueError: a real fault" in done.stderr
    assert "ERROR:apache_beam.runners.worker.data_plane:another fault" in done.stderr
    assert "ValueError: a logged fault" in done.stderr


FAILED_JOB_SCRIPT = textwrap.dedent("""
    import logging, sys, threading, traceback
    from onceflow.runners import silence_worker_threads

    logging.basicConfig()
    worker = logging.getLogger("apache_beam.runners.worker.sdk_worker")

    def timer_bundle(when):
        # What Beam's worker does with a bundle's error: print its traceback, log it.
        try:
            raise RuntimeError()  # _blocking_request on a closed state channel
        except RuntimeError:
            print(traceback.format_exc(), file=sys.stderr)
            worker.error("Error processing instruction %s. Original traceback is", when)
        raise ValueError(f"uncaught {when}")

    def in_thread(when):
        thread = threading.Thread(target=timer_bundle, args=(when,))
        thread.start()
        thread.join()

    in_thread("before")
    silence_worker_threads()
    in_thread("after")
    print("aggregate: the job's own line", file=sys.stderr)
    worker.error("the main thread logs on")
""")


def test_a_failed_jobs_worker_threads_print_nothing_once_the_job_reports_it():
    """A timer still firing when Prism shut down printed a bare `RuntimeError`
    traceback after the job's one-line error (a flaky live test)."""
    done = subprocess.run([sys.executable, "-c", FAILED_JOB_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Traceback") == 2, done.stderr  # the thread's print and its uncaught error, before
    assert "ValueError: uncaught before" in done.stderr and "Error processing instruction before" in done.stderr
    assert "after" not in done.stderr, done.stderr
    assert done.stderr.rstrip().splitlines()[-2:] == [
        "aggregate: the job's own line", "ERROR:apache_beam.runners.worker.sdk_worker:the main thread logs on"]
