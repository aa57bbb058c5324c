import math

import numpy as np
import pytest
import torch
from ray import tune

from tune_alexnet.data import load_cifar10, take_subset
from tune_alexnet.train import load_model, train_cifar

BASE = {"optimizer": "sgd", "lr": 0.01, "batch_size": 32, "dropout": False, "batchnorm": True, "width": 0.25}


class Recorder:
    """Stands in for tune.report outside Tune: keeps metrics and copies of checkpoints."""

    def __init__(self, tmp_path):
        self.tmp_path, self.metrics, self.checkpoints = tmp_path, [], []

    def __call__(self, metrics, checkpoint):
        self.metrics.append(metrics)
        if checkpoint is not None:
            kept = self.tmp_path / f"ckpt_{metrics['epoch']}"
            checkpoint.to_directory(str(kept))
            self.checkpoints.append(tune.Checkpoint.from_directory(str(kept)))
        else:
            self.checkpoints.append(None)


@pytest.fixture(scope="module")
def small(synthetic_dir):
    return take_subset(load_cifar10(synthetic_dir, progress=False), 10)


def test_overfits_one_small_batch(small, tmp_path):
    one_batch = small.__class__(small.train_x[:20], small.train_y[:20], small.train_x[:20], small.train_y[:20],
                                small.classes, "one batch")
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "batch_size": 20, "augment": False, "epochs": 40, "lr": 0.02}, one_batch, rec)
    losses = [m["train_loss"] for m in rec.metrics]
    assert losses[-1] < 0.25 * losses[0], losses
    assert rec.metrics[-1]["best_val_acc"] >= 90.0


def test_every_epoch_reports_metrics_and_a_loadable_checkpoint(small, tmp_path):
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "epochs": 2}, small, rec)
    assert [m["epoch"] for m in rec.metrics] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "epoch_time_s"):
        assert all(math.isfinite(m[key]) for m in rec.metrics), key
    model = load_model(rec.checkpoints[-1].path)
    x = torch.from_numpy(small.test_x[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert model(x).shape == (4, 10)


def test_resume_continues_at_the_same_epoch_with_the_same_counters(small, tmp_path):
    config = {**BASE, "epochs": 4, "lr": 0.005}
    straight = Recorder(tmp_path / "a")
    train_cifar(config, small, straight)
    first = Recorder(tmp_path / "b")
    train_cifar({**config, "epochs": 2}, small, first)  # "interrupted" after epoch 2
    resumed = Recorder(tmp_path / "c")
    train_cifar(config, small, resumed, checkpoint=first.checkpoints[-1])
    assert [m["epoch"] for m in resumed.metrics] == [3, 4]
    # Same weights, optimiser state and RNG stream: the resumed epochs are the uninterrupted ones.
    for a, b in zip(straight.metrics[2:], resumed.metrics):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert (a["best_val_acc"], a["best_epoch"], a["epochs_since_best"]) == \
               (b["best_val_acc"], b["best_epoch"], b["epochs_since_best"])


def test_patience_counter_survives_a_restart(small, tmp_path):
    # lr 0 never improves after epoch 1, so the counter climbs 0, 1, 2 ... across the restart.
    config = {**BASE, "lr": 0.0, "epochs": 5}
    first = Recorder(tmp_path / "a")
    train_cifar({**config, "epochs": 3}, small, first)
    assert [m["epochs_since_best"] for m in first.metrics] == [0, 1, 2]
    resumed = Recorder(tmp_path / "b")
    train_cifar(config, small, resumed, checkpoint=first.checkpoints[-1])
    assert [m["epochs_since_best"] for m in resumed.metrics] == [3, 4]
    assert resumed.metrics[-1]["best_epoch"] == 1


def test_divergence_stops_the_trial_at_once_and_keeps_the_best(small, tmp_path):
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "optimizer": "adam", "lr": 1e6, "batchnorm": False, "epochs": 10}, small, rec)
    assert rec.metrics[-1]["diverged"] is True
    assert len(rec.metrics) < 10
    assert rec.checkpoints[-1] is None  # no garbage weights saved
    assert all(not m["diverged"] for m in rec.metrics[:-1])
