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
    return command_line()
