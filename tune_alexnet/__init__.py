"""AlexNet on CIFAR-10: the 108-run hyperparameter study as a Ray Tune sweep."""

__version__ = "0.1.0"
