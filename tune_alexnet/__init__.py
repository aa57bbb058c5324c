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
    return code


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
