"""The study's early-stopping rule as a Tune stopper.

The rule: a run stops once `patience` epochs in a row bring no new best
validation accuracy, or at `max_epochs`. The training function keeps the
counter (it must survive restarts inside the trial's checkpoint) by calling
`plateau_update`, and reports it; the stopper decides from the reported
result alone. Being a pure function of the result makes it immune to Tune's
extra `done=True` call after a trial returns and to driver restarts.
"""
from __future__ import annotations

from ray import tune

DEFAULT_PATIENCE = 5
DEFAULT_MAX_EPOCHS = 100


def plateau_update(best: float, epochs_since_best: int, val_acc: float) -> tuple[float, int, bool]:
    """One epoch of the rule: (new best, new counter, improved?). Ties do not count as improving."""
    if val_acc > best:
        return val_acc, 0, True
    return best, epochs_since_best + 1, False


def should_stop(epoch: int, epochs_since_best: int, patience: int, max_epochs: int) -> bool:
    return epochs_since_best >= patience or epoch >= max_epochs


class PlateauStopper(tune.Stopper):
    def __init__(self, patience: int = DEFAULT_PATIENCE, max_epochs: int = DEFAULT_MAX_EPOCHS):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
        self.patience = patience
        self.max_epochs = max_epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("diverged"):
            return True
        epoch = result.get("epoch")
        if epoch is None:  # not one of our epoch reports
            return False
        return should_stop(epoch, result["epochs_since_best"], self.patience, self.max_epochs)

    def stop_all(self) -> bool:
        return False
