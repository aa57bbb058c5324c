"""AlexNet on CIFAR-10: the 108-run hyperparameter study as a Ray Tune sweep."""

__version__ = "0.1.0"


def main() -> int:
    """The console script. Python loads the command line in its first tenth of a second: a Ctrl-C then is one
    line too, not a traceback (the command line takes over the interruptions from there on)."""
    import sys

    try:
        from .cli import main as command_line
    except KeyboardInterrupt:
        print("tune-alexnet: interrupted while starting; nothing was run", file=sys.stderr)  # as cli._interrupted
        return 1
    code = command_line()
    _quit_at_once_on(code)
    _not_waiting_for_stalled_calls(code)
    return code


def _not_waiting_for_stalled_calls(code: int) -> None:
    """A bucket call the command gave up on (storage.within) still runs, and pyarrow's exit waits for it (85 s
    and more): the command has said its last line, so the process ends now. (Not where this process runs a Ray,
    whose own exit stops it.)"""
    import os
    import sys

    storage, ray = sys.modules.get("tune_alexnet.storage"), sys.modules.get("ray")
    if storage is None or not storage.stalled or (ray is not None and ray.is_initialized()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quit_at_once_on(code: int) -> None:
    """The command has said its last line: what follows is Python's and Ray's own shutdown (atexit), which a
    Ctrl-C (or a stop signal) would cut short with a traceback. One now ends the process at once, quietly."""
    import os
    import signal
    import sys

    def now(sig, frame) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # stopping.STOP_SIGNALS, without loading Ray
        if signal.getsignal(sig) is not signal.SIG_IGN:  # one the caller ignores (nohup) stays ignored
            signal.signal(sig, now)
