import math
import shutil

import pytest
import torch

from tune_alexnet.checkpoint import TRAINER_FILE, load_model
from tune_alexnet.data import load_cifar10, take_subset
from tune_alexnet.train import train_cifar

BASE = {"optimizer": "sgd", "lr": 0.01, "batch_size": 32, "dropout": False, "batchnorm": True, "width": 0.25}
EVERY_EPOCH = {"resume_every_s": 0}  # a resume state after every epoch


class Recorder:
    """Stands in for tune.report outside Tune: keeps metrics and copies of checkpoint folders."""

    def __init__(self, tmp_path):
        self.tmp_path, self.metrics, self.checkpoints = tmp_path, [], []

    def __call__(self, metrics, checkpoint_dir):
        self.metrics.append(metrics)
        if checkpoint_dir is not None:
            kept = self.tmp_path / f"ckpt_{metrics['epoch']:03d}"
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)
        else:
            self.checkpoints.append(None)

    def newest_first(self):
        return [c for c in reversed(self.checkpoints) if c is not None]


_SMALL = {}


@pytest.fixture(scope="module")
def small(synthetic_dir):
    _SMALL["data"] = take_subset(load_cifar10(synthetic_dir, progress=False), 10)
    return _SMALL["data"]


def small_data():
    return _SMALL["data"]


def test_overfits_one_small_batch(small, tmp_path):
    one_batch = small.__class__(
        small.train_x[:20], small.train_y[:20], small.train_x[:20], small.train_y[:20], small.classes, "one batch"
    )
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "batch_size": 20, "augment": False, "epochs": 14, "patience": 100, "lr": 0.02}, one_batch, rec)
    losses = [m["train_loss"] for m in rec.metrics]
    assert losses[-1] < 0.25 * losses[0], losses
    assert rec.metrics[-1]["best_val_acc"] >= 90.0


def test_every_epoch_reports_metrics_and_a_loadable_checkpoint(small, tmp_path):
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "epochs": 2}, small, rec)
    assert [m["epoch"] for m in rec.metrics] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "train_s", "eval_s"):
        assert all(math.isfinite(m[key]) for m in rec.metrics), key
    model = load_model(rec.checkpoints[-1])
    x = torch.from_numpy(small.test_x[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert model(x).shape == (4, 10)


class Killed(Exception):
    """What a killed worker looks like from inside: training stops right after a report."""


def interrupted(tmp_path, config, kill_after: int, runtime=EVERY_EPOCH) -> Recorder:
    rec = Recorder(tmp_path)

    def report(metrics, checkpoint_dir):
        rec(metrics, checkpoint_dir)
        if metrics["epoch"] == kill_after:
            raise Killed

    with pytest.raises(Killed):
        train_cifar(config, small_data(), report, runtime=runtime)
    return rec


CONFIG = {**BASE, "dropout": True, "epochs": 6, "patience": 100, "lr": 0.005}  # dropout: the global RNG matters


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    rec = Recorder(tmp_path_factory.mktemp("straight"))
    train_cifar(CONFIG, small, rec, runtime=EVERY_EPOCH)
    return rec


def same_epochs(a: list[dict], b: list[dict]):
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b]
    for x, y in zip(a, b):
        assert (x["train_loss"], x["val_acc"], x["best_val_acc"], x["best_epoch"], x["epochs_since_best"]) == (
            y["train_loss"],
            y["val_acc"],
            y["best_val_acc"],
            y["best_epoch"],
            y["epochs_since_best"],
        )


def test_resume_continues_from_the_resume_state_exactly(small, straight, tmp_path):
    first = interrupted(tmp_path / "a", CONFIG, kill_after=3)
    resumed = Recorder(tmp_path / "b")
    train_cifar(CONFIG, small, resumed, checkpoint_from=first.newest_first(), runtime=EVERY_EPOCH)
    # Same weights, optimizer state and every generator: the resumed epochs are the uninterrupted ones, bit for bit.
    same_epochs(resumed.metrics, straight.metrics[3:])


def test_resume_state_older_than_the_newest_checkpoint_replays_the_lost_epochs(small, straight, tmp_path):
    first = interrupted(tmp_path / "a", CONFIG, kill_after=4)
    newest, *older = first.newest_first()
    (newest / TRAINER_FILE).unlink()  # the newest holds best weights only, as between two resume states
    (older[0] / TRAINER_FILE).write_bytes(b"torn write")  # and the one before is unreadable
    resumed = Recorder(tmp_path / "b")
    train_cifar(CONFIG, small, resumed, checkpoint_from=[newest, *older], runtime=EVERY_EPOCH)
    same_epochs(resumed.metrics, straight.metrics[2:])  # from epoch 2's state: epochs 3 and 4 trained again


@pytest.mark.slow  # eight epochs, two runs
def test_without_any_resume_state_a_restart_replays_from_the_start(small, straight, tmp_path):
    first = interrupted(tmp_path / "a", CONFIG, kill_after=2, runtime={"resume_every_s": 1e9})
    assert all(not (c / TRAINER_FILE).exists() for c in first.newest_first())  # best weights only
    resumed = Recorder(tmp_path / "b")
    train_cifar(CONFIG, small, resumed, checkpoint_from=first.newest_first(), runtime={"resume_every_s": 1e9})
    same_epochs(resumed.metrics, straight.metrics)


def test_a_finished_run_keeps_its_best_weights_without_optimizer_state(small, tmp_path):
    rec = Recorder(tmp_path)
    config = {**BASE, "lr": 0.0, "epochs": 10, "patience": 2}  # lr 0: epoch 1 is the best, then a plateau
    train_cifar(config, small, rec, runtime={"resume_every_s": 1e9})
    assert [m["epoch"] for m in rec.metrics] == [1, 2, 3]  # the function ends itself by the plateau rule
    assert [m["checkpoint_kind"] for m in rec.metrics] == ["best", None, "final"]
    final = rec.checkpoints[-1]
    assert sorted(p.name for p in final.iterdir()) == ["model.json", "model.pt", "progress.json"]
    # The final checkpoint's weights are epoch 1's: they score its accuracy exactly.
    from tune_alexnet.augment import prepare_eval
    from tune_alexnet.train import to_device_nchw

    model = load_model(final)
    with torch.no_grad():
        preds = model(prepare_eval(to_device_nchw(small.test_x, torch.device("cpu")))).argmax(1)
    acc = 100.0 * (preds.numpy() == small.test_y).mean()
    assert acc == pytest.approx(rec.metrics[0]["val_acc"], abs=1e-9) and rec.metrics[-1]["best_epoch"] == 1
    # Resumed from it, the run is over: nothing is trained or reported again.
    again = Recorder(tmp_path / "again")
    train_cifar(config, small, again, checkpoint_from=final)
    assert again.metrics == []


@pytest.mark.slow  # five epochs, two runs
def test_patience_counter_survives_a_restart(small, tmp_path):
    # lr 0 never improves after epoch 1, so the counter climbs 0, 1, 2 ... across the restart.
    config = {**BASE, "lr": 0.0, "epochs": 5}
    first = interrupted(tmp_path / "a", config, kill_after=3)
    assert [m["epochs_since_best"] for m in first.metrics] == [0, 1, 2]
    resumed = Recorder(tmp_path / "b")
    train_cifar(config, small, resumed, checkpoint_from=first.newest_first())
    assert [m["epochs_since_best"] for m in resumed.metrics] == [3, 4]
    assert resumed.metrics[-1]["best_epoch"] == 1


def test_divergence_stops_the_trial_at_once_and_keeps_the_best(small, tmp_path):
    rec = Recorder(tmp_path)
    train_cifar({**BASE, "optimizer": "adam", "lr": 1e6, "batchnorm": False, "epochs": 10}, small, rec)
    assert rec.metrics[-1]["diverged"] is True
    assert len(rec.metrics) < 10
    assert all(not m["diverged"] for m in rec.metrics[:-1])
    last = rec.checkpoints[-1]  # no garbage weights saved: none, or the best ones from before
    assert last is None or rec.metrics[-1]["best_epoch"] < rec.metrics[-1]["epoch"]


RAY_BLOCKED = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed here")
sys.meta_path.insert(0, NoRay())
"""


def test_the_training_side_imports_and_trains_where_ray_cannot_be_imported(synthetic_dir, tmp_path):
    import subprocess
    import sys

    script = (
        RAY_BLOCKED
        + f"""
import tune_alexnet.augment, tune_alexnet.checkpoint, tune_alexnet.data, tune_alexnet.model, tune_alexnet.settings
from tune_alexnet.data import load_cifar10, take_subset
from tune_alexnet.train import train_cifar
try:
    import ray
except ImportError:
    print("ray: unavailable")
data = take_subset(load_cifar10({str(synthetic_dir)!r}, progress=False), 4)
seen = []
train_cifar(dict(optimizer="adam", lr=1e-3, batch_size=8, dropout=True, batchnorm=True, width=0.125, epochs=2),
            data, lambda metrics, checkpoint_dir: seen.append((metrics["epoch"], metrics["checkpoint_kind"])))
print("epochs:", seen, "ray" in sys.modules)
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ray: unavailable" in out.stdout
    assert "epochs: [(1, 'best'), (2, 'final')] False" in out.stdout


# --- the step: chunked augmentation, step modes, checkpoint pacing ------------------------------------------


class CountingStep:
    """A real TrainStep, watched: the batch sizes it was given, in order."""

    def __init__(self, step):
        self.step, self.sizes = step, []

    def __getattr__(self, name):
        return getattr(self.step, name)

    def __call__(self, inputs, targets):
        self.sizes.append(len(targets))
        self.step(inputs, targets)


def epoch_with(small, runtime: dict, seed: int = 0):
    from tune_alexnet.model import AlexNet
    from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS
    from tune_alexnet.train import TrainStep, make_optimizer, resolve_runtime, to_device_nchw, train_epoch

    torch.manual_seed(seed)
    rt = resolve_runtime(dict(TRIAL_DEFAULTS), {**RUNTIME_DEFAULTS, **runtime, "device": "cpu"}, None)
    model = AlexNet(dropout=True, batchnorm=True, width=0.125)
    opt = make_optimizer("sgd", model.parameters(), 0.01)
    step = CountingStep(TrainStep(model, opt, rt, 32))
    x, y = to_device_nchw(small.train_x, rt.device), torch.tensor(small.train_y)
    result = train_epoch(model, opt, x, y, 32, torch.Generator().manual_seed(seed), rt, step=step)
    return result, step.sizes, model


def test_chunked_augmentation_trains_every_image_once_in_the_same_batches_with_the_same_draws(small):
    n = len(small.train_y)  # 100 images: batches of 32, 32, 32 and the last 4, as the study's loader made them
    one, sizes_one, _ = epoch_with(small, {"augment_chunk": 0})
    same, sizes_same, _ = epoch_with(small, {"augment_chunk": 32})
    chunked, sizes_chunked, _ = epoch_with(small, {"augment_chunk": 64})
    whole, sizes_whole, _ = epoch_with(small, {"augment_chunk": 10_000})
    assert sizes_one == sizes_same == sizes_chunked == sizes_whole == [32, 32, 32, n - 96]
    # Each batch's draws are made in batch order whatever the chunk: the chunk changes no number, so a run
    # replays exactly when --resume gives another --augment-chunk.
    assert one == same == chunked == whole and all(math.isfinite(v) for v in one)


def test_graph_steps_on_a_cpu_train_eagerly_with_one_warning(small, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        graph, _, _ = epoch_with(small, {"step": "graph"})
    eager, _, _ = epoch_with(small, {"step": "eager"})
    assert graph == eager
    assert [r.getMessage() for r in caplog.records] == [
        "--step graph needs a CUDA device; this trial on the CPU trains eagerly"
    ]


def test_adam_and_rmsprop_keep_their_step_counts_on_the_device_for_a_captured_graph():
    from tune_alexnet.train import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("adam", "rmsprop"):
        assert make_optimizer(name, params, 0.1, capturable=True).defaults["capturable"] is True
        assert make_optimizer(name, params, 0.1).defaults["capturable"] is False
    assert "capturable" not in make_optimizer("sgd", params, 0.1, capturable=True).defaults


@pytest.mark.parametrize("best_every_s", [0, 1e9])
def test_best_weights_are_written_at_most_every_so_often_and_always_at_the_end(small, tmp_path, best_every_s):
    rec = Recorder(tmp_path)
    config = {**BASE, "augment": False, "epochs": 6, "patience": 100}
    train_cifar(config, small, rec, runtime={"resume_every_s": 1e9, "best_every_s": best_every_s})
    improved = [m["best_epoch"] == m["epoch"] for m in rec.metrics[:-1]]
    assert sum(improved) >= 2, [m["val_acc"] for m in rec.metrics]  # the pacing has something to hold back
    first = improved.index(True)
    if best_every_s == 0:  # every new best is written at once
        expected = ["best" if up else None for up in improved]
    else:  # the first, then none until the end
        expected = [None] * first + ["best"] + [None] * (len(improved) - first - 1)
    assert [m["checkpoint_kind"] for m in rec.metrics] == [*expected, "final"]
    final = load_model(rec.checkpoints[-1])  # the final checkpoint holds the last best, written before or not
    with torch.no_grad():
        from tune_alexnet.augment import prepare_eval
        from tune_alexnet.train import to_device_nchw

        preds = final(prepare_eval(to_device_nchw(small.test_x, torch.device("cpu")))).argmax(1)
    best = max(m["val_acc"] for m in rec.metrics)
    assert 100.0 * (preds.numpy() == small.test_y).mean() == pytest.approx(best, abs=1e-9)


@pytest.mark.slow  # torch.compile on the CPU: about 30 s
def test_a_compiled_step_compiles_once_although_the_epoch_ends_in_a_partial_batch(small):
    from torch._dynamo.utils import counters

    from tune_alexnet import train
    from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS

    def epoch(step_mode: str):
        config = {**TRIAL_DEFAULTS, **BASE, "width": 0.125}
        rt = train.resolve_runtime(config, {**RUNTIME_DEFAULTS, "device": "cpu", "step": step_mode}, None)
        trial = train._new_trial(config, rt)
        step = CountingStep(trial.step)
        x, y = train.to_device_nchw(small.train_x, rt.device), torch.tensor(small.train_y)
        return train.train_epoch(trial.model, trial.optimizer, x, y, 32, trial.gen, rt, step=step), step.sizes

    torch._dynamo.reset()
    counters.clear()
    (compiled, _), sizes = epoch("compile")
    assert sizes == [32, 32, 32, 4] and counters["stats"]["unique_graphs"] == 1  # the last 4 ran eagerly
    (eager, _), _ = epoch("eager")
    assert compiled == pytest.approx(eager, rel=1e-3)


class SaveAt:
    """Stands in for the trial's watch: asks for a save before the `at`-th training step; then, while held, the
    trial is either killed (a stop, a lost node) or let go on in the same process (a notice withdrawn)."""

    def __init__(self, at: int, killed: bool):
        self.at, self.killed, self.asked = at, killed, 0

    def requested(self):
        self.asked += 1
        return "stop" if self.asked == self.at else None

    def hold(self):
        if self.killed:
            raise Killed


def test_a_state_saved_inside_an_epoch_continues_it_exactly(small, tmp_path):
    """100 images in batches of 32, augmented 64 at a time: the save comes before epoch 2's second step, inside an
    augmented chunk, with dropout drawing from the global generator."""
    config, runtime = {**CONFIG, "epochs": 3}, {"augment_chunk": 64, "resume_every_s": 1e9}
    reports, kept = [], []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)
        if checkpoint_dir is not None:
            kept.append(shutil.copytree(checkpoint_dir, tmp_path / f"ckpt_{len(kept)}"))

    straight = Recorder(tmp_path / "straight")
    train_cifar(config, small, straight, runtime=runtime)
    train_cifar(config, small, report, runtime=runtime, watch=SaveAt(6, killed=False))
    saved = [m for m in reports if "epoch" not in m]
    assert [(m["saved_for"], m["saved_in_epoch"], m["saved_at_step"]) for m in saved] == [("stop", 2, 1)]
    same_epochs([m for m in reports if "epoch" in m], straight.metrics)  # went on in the same process
    reports.clear()
    with pytest.raises(Killed):
        train_cifar(config, small, report, runtime=runtime, watch=SaveAt(6, killed=True))
    assert "epoch" not in reports[-1] and (kept[-1] / TRAINER_FILE).exists()
    resumed = Recorder(tmp_path / "resumed")
    train_cifar(config, small, resumed, checkpoint_from=kept[::-1], runtime=runtime)
    same_epochs(resumed.metrics, straight.metrics[1:])  # epoch 2 from its second step on, then epoch 3


def test_a_stop_state_past_epochs_tune_never_recorded_is_passed_over(small, tmp_path):
    """Tune starts the records of a trial it holds no checkpoint of afresh: a stop's state inside epoch 2 would
    leave epoch 1 out of them, so the trial starts afresh; inside epoch 1 it goes on from the state."""
    from tune_alexnet.ray_hooks import STOP_ONLY

    config, runtime = {**CONFIG, "epochs": 2}, {"augment_chunk": 64, "resume_every_s": 1e9}
    kept = []

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            kept.append(shutil.copytree(checkpoint_dir, tmp_path / f"ckpt_{len(list(tmp_path.glob('ckpt_*')))}"))

    straight = Recorder(tmp_path / "straight")
    train_cifar(config, small, straight, runtime=runtime)
    for step in (6, 2):  # inside epoch 2, then inside epoch 1
        kept.clear()
        with pytest.raises(Killed):
            train_cifar(config, small, report, runtime=runtime, watch=SaveAt(step, killed=True))
        resumed = Recorder(tmp_path / f"resumed{step}")
        train_cifar(config, small, resumed, checkpoint_from=[(kept[-1], STOP_ONLY)], runtime=runtime)
        same_epochs(resumed.metrics, straight.metrics)  # afresh, or from the state: the same numbers
        assert (resumed.metrics[0].get("resumed_at_step") is None) == (step == 6), resumed.metrics[0]


def test_packed_trials_leave_room_for_their_contexts_and_the_chunk_fits_the_share():
    from tune_alexnet.train import fitting_chunk, memory_cap

    a10g = 23_028 * 2**20  # bytes; four trials at the default share of 0.25 (BENCHMARKS.md's arithmetic)
    assert memory_cap(0.25) == pytest.approx(0.225)
    assert 4 * (memory_cap(0.25) * a10g + 0.5e9) < a10g  # four caps and four CUDA contexts fit the card
    assert fitting_chunk(8192, memory_cap(0.25) * a10g) == 8192
    assert fitting_chunk(1_000_000, memory_cap(0.25) * a10g) == 10_362  # a quarter of the cap, 128 KiB an image
