"""A resume state is data: a tampered or foreign `trainer.pt` is passed over like a torn one (the previous state
is used, or the trial starts afresh, with one line in its log), and a state written in another step mode resumes
in this run's mode. Plain train_cifar with a report callback of its own; no Ray."""

import collections
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from tune_alexnet.checkpoint import PROGRESS_FILE, TRAINER_FILE
from tune_alexnet.data import load_cifar10, take_subset
from tune_alexnet.resume import STATE_COPIES, keep_whole_state, put_back_whole_state
from tune_alexnet.settings import METRIC
from tune_alexnet.train import train_cifar

CONFIG = {"optimizer": "adam", "lr": 0.001, "batch_size": 32, "dropout": True, "batchnorm": True, "width": 0.125,
          "epochs": 4, "patience": 100}  # fmt: skip
EVERY_EPOCH = {"resume_every_s": 0}


class Killed(Exception):
    """What a killed worker looks like from inside: training stops right after a report."""


def record(into: list, folder=None, kill_after: int | None = None):
    def report(metrics, checkpoint_dir):
        into.append(metrics)
        if checkpoint_dir is not None and folder is not None:
            shutil.copytree(checkpoint_dir, folder / f"ckpt_{metrics['epoch']}")
        if metrics["epoch"] == kill_after:
            raise Killed

    return report


@pytest.fixture(scope="module")
def runs(synthetic_dir, tmp_path_factory):
    """The data, an uninterrupted run's epochs, and the checkpoints of a run killed after epoch 2."""
    data = take_subset(load_cifar10(synthetic_dir, progress=False), 10)
    straight: list = []
    train_cifar(CONFIG, data, record(straight), runtime=EVERY_EPOCH)
    folder = tmp_path_factory.mktemp("killed")
    with pytest.raises(Killed):
        train_cifar(CONFIG, data, record([], folder, kill_after=2), runtime=EVERY_EPOCH)
    return data, straight, folder


def resumed_from(runs, tmp_path, tamper=None, older_too=False):
    data, _, folder = runs
    copy = shutil.copytree(folder, tmp_path / "ckpts")
    newest, older = copy / "ckpt_2", copy / "ckpt_1"
    for ckpt in [newest, older] if older_too else [newest]:
        if tamper is not None:
            state = torch.load(ckpt / TRAINER_FILE, weights_only=True)
            tamper(state)
            torch.save(state, ckpt / TRAINER_FILE)
    metrics: list = []
    train_cifar(CONFIG, data, record(metrics), checkpoint_from=[newest, older], runtime=EVERY_EPOCH)
    return metrics


def same_epochs(a: list[dict], b: list[dict]):
    keys = ("epoch", "train_loss", "val_acc", "best_val_acc", "best_epoch", "epochs_since_best")
    assert [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]


def group(state):
    return state["optimizer"]["param_groups"][0]


def captured_step(state):
    """What a `--step graph` trial writes: capturable groups, float step counts (on its GPU, read on the CPU)."""
    group(state)["capturable"] = True
    for s in state["optimizer"]["state"].values():
        s["step"] = s["step"].to(torch.float32)


def test_a_state_written_by_a_captured_step_resumes_eagerly_on_the_cpu(runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        metrics = resumed_from(runs, tmp_path, captured_step)
    same_epochs(metrics, runs[1][2:])  # from epoch 2's state, exactly as the uninterrupted run
    assert not caplog.records


TAMPERED = {
    "lr 1e30": lambda s: group(s).update(lr=1e30),
    "lr -5": lambda s: group(s).update(lr=-5.0),
    "NaN weight decay": lambda s: group(s).update(weight_decay=math.nan),
    "odd Adam betas": lambda s: group(s).update(betas=(1.5, -0.2)),
    "epoch -100": lambda s: s["counters"].update(epoch=-100),
    "epoch 10**6": lambda s: s["counters"].update(epoch=10**6),
    "no counters": lambda s: s.pop("counters"),
    "weights of another network": lambda s: s["model"].pop(next(iter(s["model"]))),
    # each parameter's optimizer state: shapes, finite numbers, the step count the counters give
    "exp_avg of another shape": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
    "NaN in exp_avg_sq": lambda s: s["optimizer"]["state"][1]["exp_avg_sq"].view(-1)[0].fill_(math.nan),
    "negative exp_avg_sq": lambda s: s["optimizer"]["state"][1]["exp_avg_sq"].neg_().sub_(1),
    "step -1": lambda s: s["optimizer"]["state"][0]["step"].fill_(-1),
    "step 2.5": lambda s: s["optimizer"]["state"][0]["step"].fill_(2.5),
    "step 10**9": lambda s: s["optimizer"]["state"][0]["step"].fill_(10**9),
    "a parameter the network lacks": lambda s: s["optimizer"]["state"].update({999: s["optimizer"]["state"][0]}),
    "a parameter's state dropped": lambda s: s["optimizer"]["state"].pop(2),
    "NaN weights": lambda s: next(iter(s["model"].values())).view(-1)[0].fill_(math.nan),
    "an invalid generator state": lambda s: s["generator"].fill_(255),
    "a generator state of another size": lambda s: s.update(torch_rng=torch.zeros(10, dtype=torch.uint8)),
    # kinds of tensor torch.load takes, that the checks or the optimizer's first step raised on
    "a meta exp_avg": lambda s: s["optimizer"]["state"][0].update(
        exp_avg=s["optimizer"]["state"][0]["exp_avg"].to("meta")
    ),
    "sparse weights": lambda s: s["model"].update({k: v.to_sparse() for k, v in s["model"].items() if v.dim() == 2}),
    "an exp_avg of one shared number": lambda s: s["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(1).expand(s["optimizer"]["state"][0]["exp_avg"].shape)
    ),
    # a dictionary keyed by a tensor of 6**10 numbers kept in one: the checks spelled the key whole (minutes, GBs)
    "a tensor as a key": lambda s: s["counters"].update({torch.zeros(1).expand(*(6,) * 10): 0}),
}
UNREAD = ("sparse weights", "a tensor as a key")  # refused as the pickle is read: torch.save never writes them


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_state_is_passed_over_for_the_previous_one_with_one_line(runs, tmp_path, caplog, case):
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        metrics = resumed_from(runs, tmp_path, TAMPERED[case])
    same_epochs(metrics, runs[1][1:])  # from epoch 1's state: epoch 2 trained again, the same numbers
    lines = [r.getMessage() for r in caplog.records]
    why = "is unreadable" if case in UNREAD else "does not fit this trial"
    assert len(lines) == 1 and why in lines[0] and "ckpt_2" in lines[0], lines


@pytest.mark.parametrize("counters", [[1], 5, "x", torch.zeros(3), {"epoch": torch.zeros(3)}],
                         ids=["a list", "a number", "a string", "a tensor", "a tensor epoch"])  # fmt: skip
def test_an_odd_stray_stop_state_is_passed_over_for_the_state_tune_recorded(runs, tmp_path, counters):
    """A stop's state that Tune never recorded is looked at before the full checks: counters of another type
    failed the trial at every try, with a traceback, and the states before it were never tried."""
    data, _, folder = runs
    copy = shutil.copytree(folder, tmp_path / "ckpts")
    stray = shutil.copytree(copy / "ckpt_2", copy / "ckpt_3")
    state = torch.load(stray / TRAINER_FILE, weights_only=True)
    state.update(counters=counters, position={"epoch": 3, "steps": 1})
    torch.save(state, stray / TRAINER_FILE)
    metrics: list = []
    train_cifar(CONFIG, data, record(metrics), checkpoint_from=[(stray,), copy / "ckpt_2", copy / "ckpt_1"],
                runtime=EVERY_EPOCH)  # fmt: skip
    same_epochs(metrics, runs[1][2:])  # from epoch 2's state, which Tune recorded


@pytest.mark.timeout(60)
def test_a_lone_stop_state_whose_epoch_is_6_to_the_10_numbers_in_one_is_passed_over_at_once(runs, tmp_path):
    """Where Tune recorded nothing, a stop's state is passed over with a line naming its epoch: one that was a
    tensor of 6**10 numbers (a stride of 0 keeps them in one) was spelled whole, for minutes."""
    data, straight, folder = runs
    stray = shutil.copytree(folder / "ckpt_2", tmp_path / "ckpt_3")
    state = torch.load(stray / TRAINER_FILE, weights_only=True)
    state.update(counters={"epoch": torch.zeros(1).expand(*(6,) * 10)}, position={"epoch": 3, "steps": 1})
    torch.save(state, stray / TRAINER_FILE)
    metrics: list = []
    train_cifar(CONFIG, data, record(metrics), checkpoint_from=[(stray,)], runtime=EVERY_EPOCH)
    same_epochs(metrics, straight)  # afresh


def test_a_state_whose_mapping_shadows_its_methods_resumes_as_its_values_say(runs, tmp_path):
    """A pickle may set attributes on the OrderedDict it builds: `get` set to a number failed the trial at every
    --resume, outside the checks, and the trial could never go on."""
    data, _, folder = runs
    copy = shutil.copytree(folder, tmp_path / "ckpts")
    state = collections.OrderedDict(torch.load(copy / "ckpt_2" / TRAINER_FILE, weights_only=True))
    state.get = 5
    torch.save(state, copy / "ckpt_2" / TRAINER_FILE)
    metrics: list = []
    train_cifar(CONFIG, data, record(metrics), checkpoint_from=[copy / "ckpt_2", copy / "ckpt_1"], runtime=EVERY_EPOCH)
    same_epochs(metrics, runs[1][2:])  # from epoch 2's state, its values as they were


def test_a_state_rewritten_after_its_check_is_loaded_as_checked(runs, tmp_path, monkeypatch):
    """The check and torch.load each read the file anew: whoever could write it in between had torch load a
    pickle the check never saw."""
    from tune_alexnet import checkpoint

    _, _, folder = runs
    copy = shutil.copytree(folder / "ckpt_2", tmp_path / "ckpt_2")
    check = checkpoint.archive_problem

    def then_rewritten(archive):
        found = check(archive)
        (copy / TRAINER_FILE).write_bytes(b"PK\x03\x04 a pickle the check never saw")  # in place: the same file
        return found

    monkeypatch.setattr(checkpoint, "archive_problem", then_rewritten)
    network = {k: CONFIG[k] for k in ("dropout", "batchnorm", "width")}
    trainer, _ = checkpoint.read_resume(copy, checkpoint.network_bytes(network))
    assert trainer["counters"]["epoch"] == 2


def test_with_every_state_tampered_the_trial_starts_afresh(runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        metrics = resumed_from(runs, tmp_path, TAMPERED["lr 1e30"], older_too=True)
    same_epochs(metrics, runs[1])
    assert len(caplog.records) == 2


@pytest.mark.parametrize(
    "edit, trainer, resumes_from",
    [
        ({}, False, 1),  # epoch 2 of 4, patience 100: no rule ends the run there
        ({"epochs_since_best": 100}, False, 1),  # more epochs without improvement than were run
        ({"epoch": 4}, False, None),  # the last epoch: the run ended
        ({"diverged": True}, False, None),
        ({"epoch": 4}, True, 2),  # a resume state beside it: a final checkpoint never has one
        ({"diverged": True}, True, 2),
    ],
)
def test_a_final_checkpoint_ends_the_trial_only_where_it_reads_as_a_run_that_ended(
    runs, tmp_path, caplog, edit, trainer, resumes_from
):
    """A final checkpoint ends the trial on resume: one no stopping rule could give, or with a resume state beside
    it (an edited progress.json) is passed over with one line, and the trial goes on from a resume state."""
    data, straight, folder = runs
    copy = shutil.copytree(folder, tmp_path / "ckpts")
    if not trainer:
        (copy / "ckpt_2" / TRAINER_FILE).unlink()  # as a sweep writes a final checkpoint
    progress = json.loads((copy / "ckpt_2" / PROGRESS_FILE).read_text())
    (copy / "ckpt_2" / PROGRESS_FILE).write_text(json.dumps({**progress, "kind": "final", **edit}))
    metrics: list = []
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        train_cifar(
            CONFIG, data, record(metrics), checkpoint_from=[copy / "ckpt_2", copy / "ckpt_1"], runtime=EVERY_EPOCH
        )
    lines = [r.getMessage() for r in caplog.records]
    if resumes_from is None:
        assert metrics == [] and lines == []
    else:
        same_epochs(metrics, straight[resumes_from:])
        why = "it holds a resume state" if trainer else "patience 100"
        assert len(lines) == 1 and "does not end this trial (" in lines[0] and why in lines[0], lines


# --- a state saved inside an epoch (a stop, a spot notice) --------------------------------------------------


class SaveAt:
    """A Watch that asks for a save before the `step`-th training step (counted from 1 over the run), then, as
    the killed node would, never comes back from the hold."""

    def __init__(self, step: int):
        self.calls, self.step = 0, step

    def requested(self):
        self.calls += 1
        return "stop" if self.calls == self.step else None

    def hold(self):
        raise Killed


@pytest.fixture(scope="module")
def saved_inside(runs, tmp_path_factory):
    """The checkpoints of a run that saved at the third of epoch 2's four steps and was then killed."""
    data, _, _ = runs
    folder = tmp_path_factory.mktemp("inside")

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, folder / f"ckpt_{metrics.get('epoch', 'saved')}")

    with pytest.raises(Killed):
        train_cifar(CONFIG, data, report, runtime=EVERY_EPOCH, watch=SaveAt(4 + 3))
    return folder


def resumed_inside(runs, saved_inside, tmp_path, tamper=None):
    copy = shutil.copytree(saved_inside, tmp_path / "ckpts")
    if tamper is not None:
        state = torch.load(copy / "ckpt_saved" / TRAINER_FILE, weights_only=True)
        tamper(state["position"])
        torch.save(state, copy / "ckpt_saved" / TRAINER_FILE)
    metrics: list = []
    train_cifar(CONFIG, runs[0], record(metrics), checkpoint_from=[copy / "ckpt_saved", copy / "ckpt_1"],
                runtime=EVERY_EPOCH)  # fmt: skip
    return metrics


def test_a_state_saved_inside_an_epoch_resumes_it_exactly(runs, saved_inside, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        metrics = resumed_inside(runs, saved_inside, tmp_path)
    same_epochs(metrics, runs[1][1:])
    assert not caplog.records


POSITIONS = {
    "loss_sum NaN": lambda p: p["loss_sum"].fill_(math.nan),
    "loss_sum negative": lambda p: p["loss_sum"].fill_(-1e6),
    "correct above the images seen": lambda p: p["correct"].fill_(10**6),
    "train_s inf": lambda p: p.update(train_s=math.inf),
    "a position in another epoch": lambda p: p.update(epoch=1),
    "a chunk generator state of another size": lambda p: p.update(chunk_gen=torch.zeros(10, dtype=torch.uint8)),
    "an invalid chunk generator state": lambda p: p["chunk_gen"].fill_(255),
    "loss_sum of shape (1,)": lambda p: p.update(loss_sum=p["loss_sum"].reshape(1)),
    "correct of shape (1, 1)": lambda p: p.update(correct=p["correct"].reshape(1, 1)),
}


@pytest.mark.parametrize("case", POSITIONS)
def test_a_refused_position_falls_back_to_a_whole_older_state(runs, saved_inside, tmp_path, caplog, case):
    """Never the saved weights trained from the epoch's start: the older state's weights and optimizer too."""
    with caplog.at_level(logging.WARNING, logger="tune_alexnet.train"):
        metrics = resumed_inside(runs, saved_inside, tmp_path, POSITIONS[case])
    same_epochs(metrics, runs[1][1:])  # from epoch 1's state: epoch 2 trained whole, the same numbers
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not fit this trial" in lines[0] and "ckpt_saved" in lines[0], lines


def test_a_position_past_the_end_of_the_data_is_refused():
    """The last chunk of 100 images in chunks of 64 holds 36: a tampered step 7 at image 112 passed the checks,
    and the epoch's accuracy was counted over 112 images."""
    from tune_alexnet.resume import position_problem

    p = {"order": torch.randperm(100), "chunk": 64, "first": 64, "start": 32, "seen": 96, "steps": 6,
         "loss_sum": torch.tensor(1.0), "correct": torch.tensor(10), "train_s": 1.0,
         "chunk_gen": torch.Generator().get_state()}  # fmt: skip
    assert position_problem(p, 100, 16) is None
    p.update(start=48, seen=112, steps=7)
    assert position_problem(p, 100, 16) == "step 7 at image 112 does not fall on a step of this epoch"


# --- end to end: a sweep stopped, its resume state made a captured-step one, resumed on the CPU -------------


@pytest.mark.slow
def test_a_sweep_resumes_a_captured_step_state_on_the_cpu_and_keeps_the_flags_given(synthetic_dir, tmp_path):
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    storage, name, epochs = tmp_path / "results", "captured", 6
    exp_dir = storage / name
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def sweep(args, log):
        cmd = [sys.executable, "-m", "tune_alexnet", "sweep", "--storage", str(storage), "--name", name, *args]
        return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def states():
        return sorted(exp_dir.glob(f"train_cifar_*/checkpoint_*/{TRAINER_FILE}"))

    first = sweep(["--data-dir", synthetic_dir, "--optimizer", "adam", "--lr", "0.001", "--batch-size", "32",
                   "--dropout", "true", "--batchnorm", "true", "--width", "0.125", "--epochs", str(epochs),
                   "--patience", "100", "--resume-every", "0"], tmp_path / "first.log")  # fmt: skip
    deadline = time.monotonic() + 240
    copies = exp_dir / STATE_COPIES

    def named_checkpoint(raw: bytes) -> str | None:
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            return json.loads(json.loads(raw)["trial_data"][0][1])["last_result"]["checkpoint_dir_name"]
        return None

    def wait(until) -> None:
        while not until():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)

    # A whole copy of Tune's state naming a checkpoint, kept aside ...
    stale = {}

    def copy_names_a_checkpoint() -> bool:
        for copy in copies.glob("*.json"):
            with contextlib.suppress(OSError):
                raw = copy.read_bytes()
                if name := named_checkpoint(raw):
                    stale.update(raw=raw, name=name, file=copy.name)
        return bool(stale)

    wait(copy_names_a_checkpoint)

    # ... then the sweep killed once Tune has replaced (deleted) that checkpoint and the state after epoch 2 is on
    # disk: Tune's state lags its deletions by seconds, so a kill can leave its newest state naming a checkpoint
    # that is gone. Forced here: the copy put back is the stale one.
    def replaced() -> bool:
        gone = not any(exp_dir.glob(f"train_cifar_*/{stale['name']}"))
        return gone and any(int(p.parent.name.split("_")[1]) >= 1 for p in states())

    wait(replaced)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (copies / stale["file"]).write_bytes(stale["raw"])
    # A kill while Tune rewrote its experiment state leaves it empty (Tune truncates, then writes): as here.
    (cut,) = exp_dir.glob("experiment_state-*.json")
    assert cut.name == stale["file"]
    cut.write_bytes(b"")
    for path in states():  # as a --step graph trial on a GPU writes it
        state = torch.load(path, weights_only=True)
        captured_step(state)
        torch.save(state, path)

    resumed = sweep(["--resume", "--augment-chunk", "64", "--no-tf32"], tmp_path / "resume.log")
    assert resumed.wait(240) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    said = (tmp_path / "resume.log").read_text()
    assert f"the experiment state {cut.name} was cut short" in said
    assert f"the experiment state {cut.name} names checkpoints some trials no longer have" in said
    table = pd.read_parquet(exp_dir / "results.parquet")
    assert list(table["status"]) == ["terminated"] and list(table["epochs_run"]) == [epochs]
    seen = pd.read_parquet(exp_dir / "epochs.parquet")
    # Resumed from the newest checkpoint kept, not afresh: no epoch twice. Where Tune had not yet saved the
    # results of the epochs up to it (it saves them with its state), those rows are missing, and the line says so.
    assert seen["epoch"].is_unique and {1, epochs} <= set(seen["epoch"]), seen["epoch"].tolist()
    assert (set(seen["epoch"]) != set(range(1, epochs + 1))) == ("were not saved" in said), said
    last = seen[seen["epoch"] == epochs].iloc[0]  # how the epoch ran is in the table
    assert (last["step_mode"], bool(last["tf32"]), int(last["augment_chunk"])) == ("eager", False, 64)
    # The flags given with --resume are the experiment's now: the next --resume keeps them.
    runtime = json.loads((exp_dir / "tune_alexnet_sweep.json").read_text())["runtime"]
    assert runtime["augment_chunk"] == 64 and runtime["tf32"] is False and runtime["resume_every_s"] == 0


def test_rmsprop_resumed_from_a_captured_state_matches_step_by_step_on_the_cpu():
    """RMSprop at lr 1e-3 is chaotic over hundreds of steps (a loss spike near 490), so trajectories are compared
    step by step over the first 20, tightly: 10 steps, the state as a `--step graph` trial writes it, then 10 more
    on the CPU in eager mode, against 20 steps straight."""
    from tune_alexnet import resume
    from tune_alexnet.model import AlexNet
    from tune_alexnet.settings import RUNTIME_DEFAULTS, TRIAL_DEFAULTS
    from tune_alexnet.train import TrainStep, make_optimizer, resolve_runtime

    rt = resolve_runtime({**TRIAL_DEFAULTS, "precision": "fp32"}, {**RUNTIME_DEFAULTS, "device": "cpu"}, None)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 16, 3, 32, 32, generator=g), torch.randint(0, 10, (20, 16), generator=g)

    def fresh():
        torch.manual_seed(0)
        model = AlexNet(dropout=False, batchnorm=True, width=0.125).train()
        opt = make_optimizer("rmsprop", model.parameters(), 0.001)
        return model, opt, TrainStep(model, opt, rt, 16)

    def steps(step, first, last):
        out = []
        for i in range(first, last):
            step.begin_epoch()
            step(x[i], y[i])
            out.append(step.loss_sum.item() / 16)
        return out

    straight = steps(fresh()[2], 0, 20)
    model, opt, step = fresh()
    half = steps(step, 0, 10)
    state = {"optimizer": opt.state_dict()}
    captured_step(state)
    weights = model.state_dict()
    model, opt, step = fresh()
    model.load_state_dict(weights)
    opt.load_state_dict(resume.in_step_mode(state["optimizer"], capturable=False))
    assert half + steps(step, 10, 20) == pytest.approx(straight, rel=1e-6)


def test_a_cut_experiment_state_is_put_back_from_its_staged_copy_and_a_whole_one_is_left_alone(tmp_path):
    staging, exp = tmp_path / "staging", tmp_path / "exp"
    staging.mkdir(), exp.mkdir()
    keep_whole_state(str(staging), str(exp))
    assert not (exp / STATE_COPIES).exists() and put_back_whole_state(str(exp)) is None  # none yet
    name = "experiment_state-2026-12-05_01-00-00.json"
    (staging / name).write_text('{"trial_data": [["{}", "{}"]]}')
    keep_whole_state(str(staging), str(exp))
    (exp / name).write_text('{"trial_data": [["{}", "{}"]]}')  # Tune's copy into the experiment
    assert (exp / STATE_COPIES / name).read_text() == (staging / name).read_text()
    assert put_back_whole_state(str(exp)) is None  # whole: nothing to mend
    newer = "experiment_state-2026-12-05_02-00-00.json"  # a resumed session stages its own
    (staging / newer).write_text('{"trial_data": []}')
    keep_whole_state(str(staging), str(exp))
    assert [p.name for p in (exp / STATE_COPIES).iterdir()] == [newer]  # one copy: of what Tune reads
    (exp / newer).write_bytes(b"")  # killed while Tune copied it: truncated, nothing written yet
    assert "was cut short" in put_back_whole_state(str(exp))
    assert (exp / newer).read_text() == '{"trial_data": []}'
    # The search algorithm's state, a pickle Tune names .json, is saved the same way, and a cut one made Tune's
    # restore start the search afresh: a trial with an empty config, failing at every try.
    search = "basic-variant-state-2026-12-05_02-00-00.json"
    (staging / search).write_bytes(pickle.dumps({"finished": True}))
    keep_whole_state(str(staging), str(exp))
    assert sorted(p.name for p in (exp / STATE_COPIES).iterdir()) == [search, newer]  # one of each kind
    for cut in (b"", pickle.dumps({"finished": True})[:-3]):
        (exp / search).write_bytes(cut)
        said = put_back_whole_state(str(exp))
        assert said.startswith(f"the search state {search} was cut short (the sweep was killed while Tune wrote it)")
        assert pickle.loads((exp / search).read_bytes()) == {"finished": True}
    assert put_back_whole_state(str(exp)) is None


LEFT = {  # what the trial's folder holds once Tune's state names a checkpoint that is gone
    "a newer one": "checkpoint_000007, its final one: it had ended (the results of its last epochs before it were "
    "not saved)",
    "a newer one, its result row edited": "checkpoint_000007, its final one: it had ended",  # strings for numbers,
    # a line not UTF-8
    "none": None,
    "only a newer one that is empty, and a file": None,
}


@pytest.mark.parametrize("left", LEFT)
def test_a_state_naming_a_replaced_checkpoint_points_the_trial_at_its_newest_kept_one(mixed_experiment, tmp_path,
                                                                                      left):  # fmt: skip
    """Tune's state lags its checkpoint deletions by seconds: a kill between leaves it naming a checkpoint that is
    gone, which Tune cannot restore. Here on a copy of a finished experiment (moved: Tune re-roots its paths)."""
    from tune_alexnet.resume import _unpickled, point_at_kept_checkpoints  # _unpickled: read as Tune reads it

    exp = tmp_path / "moved"
    shutil.copytree(mixed_experiment[0], exp)
    (state_file,) = exp.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    pair = next(p for p in state["trial_data"] if json.loads(p[1])["last_result"].get("checkpoint_dir_name"))
    trial = json.loads(pair[0])
    pair[0] = json.dumps({**trial, "status": "RUNNING"})  # as a kill leaves a trial that was training
    state["trial_data"].insert(0, ["{}", "[]"])  # a pair that is not Tune's: the others are mended all the same
    state_file.write_text(json.dumps(state))
    (folder,) = exp.glob(f"train_cifar_{trial['trial_id']}_*")
    named = json.loads(pair[1])["last_result"]["checkpoint_dir_name"]
    if left.startswith("a newer one"):  # Tune replaced it with checkpoint_000007 after its last save
        (folder / named).rename(folder / "checkpoint_000007")
    else:
        shutil.rmtree(folder / named)
    if left == "a newer one, its result row edited":
        row = {"checkpoint_dir_name": "checkpoint_000007", "training_iteration": 10**30, "time_total_s": "x",
               "checkpoint_rank": math.nan}  # fmt: skip
        with (folder / "result.json").open("ab") as f:
            f.write(json.dumps(row).encode() + b"\n\xff\xfe\n")
    if left.startswith("only"):
        (folder / "checkpoint_000007").mkdir()
        (folder / "checkpoint_000008").write_text("")
    said = point_at_kept_checkpoints(str(exp))
    assert said.startswith(f"the experiment state {state_file.name} names checkpoints some trials no longer have")
    mended = json.loads(state_file.read_text())["trial_data"][state["trial_data"].index(pair)]
    storage = _unpickled(json.loads(mended[0])["storage"])
    latest = _unpickled(json.loads(mended[1])["checkpoint_manager"]).latest_checkpoint_result
    if LEFT[left]:
        assert said.endswith(f"{trial['trial_id']} from {LEFT[left]}")
        assert latest.checkpoint.path.endswith("/checkpoint_000007") and storage.current_checkpoint_index == 7
        numbers = {k: v for k, v in latest.metrics.items() if k != METRIC}
        assert all(isinstance(v, int | float) and -math.inf <= v < 1e12 for v in numbers.values()), latest.metrics
        assert METRIC in latest.metrics  # even unknown (NaN): Tune's check of a result that lacks it stops the sweep
    else:
        assert said.endswith(f"{trial['trial_id']} afresh, none is left")
        assert latest is None and storage.current_checkpoint_index == (8 if left.startswith("only") else -1)
    assert point_at_kept_checkpoints(str(exp)) is None  # every named checkpoint is there now


@pytest.mark.slow  # a resume in a new driver, which starts its own Ray
@pytest.mark.parametrize("recorded", ["replaced", "kept"])
def test_a_trial_whose_final_result_was_not_saved_resumes_to_its_end_and_its_row_is_rebuilt(mixed_experiment,
                                                                                             tmp_path, recorded):  # fmt: skip
    """A kill just after a trial's last epoch can leave Tune's state naming an older checkpoint (replaced by the
    final one, or not yet), and result.json without the final epoch's row. The trial has nothing left to train:
    its resume ends at once (it was trained again from the older one), Tune takes its last result from the
    mended state (a missing metric stopped the whole resumed sweep), and the tables read how it ended from the
    row rebuilt from its final checkpoint."""
    from tune_alexnet.export import load_experiment

    exp = tmp_path / "mixed"
    shutil.copytree(mixed_experiment[0], exp)
    done = load_experiment(exp).table.set_index("trial_id").loc[lambda t: t["status"] == "terminated"]
    (state_file,) = exp.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    pair = next(p for p in state["trial_data"] if json.loads(p[1])["last_result"].get("checkpoint_dir_name"))
    trial = json.loads(pair[0])
    pair[0] = json.dumps({**trial, "status": "RUNNING"})  # as a kill leaves a trial that was training
    state_file.write_text(json.dumps(state))
    (folder,) = exp.glob(f"train_cifar_{trial['trial_id']}_*")
    rows = (folder / "result.json").read_bytes().splitlines(keepends=True)
    (folder / "result.json").write_bytes(b"".join(rows[:-1]) + rows[-1][:40])  # its last row cut as a kill cuts it
    named = json.loads(rows[-1])["checkpoint_dir_name"]
    (folder / named).rename(folder / "checkpoint_000007")
    if recorded == "kept":  # the one Tune's state names, of the epoch before
        shutil.copytree(folder / "checkpoint_000007", folder / named)
        progress = json.loads((folder / named / PROGRESS_FILE).read_text())
        (folder / named / PROGRESS_FILE).write_text(json.dumps({**progress, "kind": "best", "epoch": 2}))

    resume = [sys.executable, "-m", "tune_alexnet", "sweep", "--resume", "--name", "mixed", "--storage", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new driver, as after a kill
    ran = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=240)
    assert ran.returncode == 1, ran.stdout[-3000:] + ran.stderr[-3000:]  # 1: the experiment's errored trials
    assert f"{trial['trial_id']} from checkpoint_000007, its final one: it had ended" in ran.stdout + ran.stderr
    assert f"the last result line of trial(s) {trial['trial_id']} was cut by the kill" in ran.stderr
    table = load_experiment(exp).table.set_index("trial_id")
    mine = table.loc[trial["trial_id"]]
    assert mine["status"] == "terminated" and mine["epochs_run"] == 3
    assert mine["final_accuracy"] == done.loc[trial["trial_id"], "final_accuracy"]
    assert mine["best_checkpoint"].endswith("checkpoint_000007")
    epochs = [json.loads(r)["epoch"] for r in (folder / "result.json").read_bytes().splitlines() if r.startswith(b"{\"")
              and r.endswith(b"}") and "epoch" in json.loads(r)]  # fmt: skip
    assert epochs == [1, 2, 3]  # none trained again; the last one rebuilt


def test_a_result_line_cut_by_a_kill_is_ended_so_the_resumed_results_after_it_are_read(tmp_path):
    import pyarrow.fs

    from tune_alexnet.export import _read_results
    from tune_alexnet.resume import end_cut_result_lines

    whole, cut = tmp_path / "train_cifar_aaaaa_00000_0_x", tmp_path / "train_cifar_aaaaa_00001_1_x"
    for folder in (whole, cut):
        folder.mkdir()
        (folder / "result.json").write_text('{"epoch": 1}\n{"epoch": 2, "train_lo')
    (whole / "result.json").write_text('{"epoch": 1}\n')
    (tmp_path / "train_cifar_aaaaa_00002_2_x").mkdir()  # no result.json yet
    said = end_cut_result_lines(str(tmp_path))
    assert said == "the last result line of trial(s) aaaaa_00001 was cut by the kill; it is passed over"
    assert end_cut_result_lines(str(tmp_path)) is None and (whole / "result.json").read_text() == '{"epoch": 1}\n'
    with (cut / "result.json").open("a") as f:  # as Tune appends the resumed trial's results
        f.write('{"epoch": 2}\n{"epoch": 3}\n')
    epochs = [r["epoch"] for r in _read_results(pyarrow.fs.LocalFileSystem(), str(tmp_path), cut.name)]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("case", ["whole", "half-copied", "result.json a link"])
def test_a_final_checkpoint_beyond_the_state_is_the_trials_end_only_where_it_is_whole(tmp_path, case):
    """What a kill leaves in a trial folder: a final checkpoint newer than Tune's record, results up to a stop's
    row. Only a whole one ends the trial (with its row rebuilt); the row is never written through a link."""
    from tune_alexnet.resume import _final_after, _newest_checkpoint

    trial_dir, victim = tmp_path / "train_cifar_aaaaa_00000_0_x", tmp_path / "victim.txt"
    final = trial_dir / "checkpoint_000003"
    final.mkdir(parents=True)
    progress = {"epoch": 3, "best_val_acc": 40.0, "best_epoch": 3, "epochs_since_best": 0, "train_time_s": 1.0,
                "eval_time_s": 0.5, "kind": "final"}  # fmt: skip
    (final / PROGRESS_FILE).write_text(json.dumps(progress))
    (final / "model.json").write_text("{}")
    if case != "half-copied":
        (final / "model.pt").write_bytes(b"weights")
    rows = [{"epoch": 1, "training_iteration": 1}, {"epoch": 2, "training_iteration": 2},
            {"saved_for": "stop", "training_iteration": 3}]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if case == "result.json a link":
        victim.write_text(text)
        (trial_dir / "result.json").symlink_to(victim)
    else:
        (trial_dir / "result.json").write_text(text)
    trial = {"trial_id": "aaaaa_00000", "config": {"epochs": 3, "patience": 5}}
    ended = _final_after(str(trial_dir), None, trial["config"])
    name, metrics, lost = _newest_checkpoint(str(trial_dir), "checkpoint_rank", trial)
    written = (trial_dir / "result.json").read_text().splitlines()[len(rows) :]
    if case == "whole":
        assert ended and name == "checkpoint_000003" and not lost  # epoch 2's row is there: none is lost
        (row,) = map(json.loads, written)
        assert (row["epoch"], row["checkpoint_kind"], row["training_iteration"]) == (3, "final", 4)
        assert metrics["score"] == pytest.approx(40.0, abs=0.01)
    elif case == "half-copied":
        assert not ended and name is None and not written  # not a checkpoint at all: Tune's record stands
    else:
        assert ended and name == "checkpoint_000003" and lost  # not rebuilt: not written through the link
        assert victim.read_text() == text
