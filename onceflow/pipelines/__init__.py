"""The runnable pipelines: ``python -m onceflow.pipelines.<job>`` (or ``onceflow run <job>``)."""

import sys

from onceflow.errors import hold_interrupts


def _interrupt_in_one_line_when_run_as_a_module() -> None:
    """``python -m onceflow.pipelines.<job>`` imports Beam (about a second) before
    the job's ``main`` can catch Ctrl-C, and an interrupt then printed a traceback
    of some 40 lines from inside Beam's imports. For that command line only (read
    from ``sys.orig_argv``; never in a program that imports onceflow), an uncaught
    interrupt is one line instead, and Ctrl-C is held until the job's entry point
    starts (:func:`onceflow.errors.exit_status` raises it there): raised inside
    the imports it could be lost."""
    argv = list(getattr(sys, "orig_argv", ()))
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if not module.startswith(__name__ + "."):
        return
    job = module.rsplit(".", 1)[-1]
    previous = sys.excepthook

    def hook(kind, value, trace):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{job}: interrupted", file=sys.stderr)
        else:
            previous(kind, value, trace)

    sys.excepthook = hook
    hold_interrupts()


_interrupt_in_one_line_when_run_as_a_module()
