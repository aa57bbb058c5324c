"""The study's early-stopping rule, as plain functions of what a trial reports.

A run stops once `patience` epochs in a row bring no new best test accuracy, or at
its epoch limit. The training function applies the rule to end itself, and the
sweep's Tune stopper applies the same functions to the reported result, so the
two never disagree. Being pure functions of the result makes the stopper immune
to Tune's extra `done=True` call after a trial returns and to driver restarts.
"""

from __future__ import annotations


def plateau_update(best: float, epochs_since_best: int, val_acc: float) -> tuple[float, int, bool]:
    """One epoch of the rule: (new best, new counter, improved?). Ties do not count as improving."""
    if val_acc > best:
        return val_acc, 0, True
    return best, epochs_since_best + 1, False


def should_stop(epoch: int, epochs_since_best: int, patience: int, max_epochs: int) -> bool:
    return epochs_since_best >= patience or epoch >= max_epochs


def result_says_stop(result: dict, patience: int, max_epochs: int) -> bool:
    """The rule on one reported result; results that are not epoch reports never stop a trial."""
    if result.get("diverged"):
        return True
    if result.get("epoch") is None:
        return False
    return should_stop(result["epoch"], result["epochs_since_best"], patience, max_epochs)
