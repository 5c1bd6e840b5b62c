"""A live job being stopped keeps the runner's hang-up of its workers quiet."""

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
