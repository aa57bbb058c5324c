"""A resume state (`trainer.pt`) is data from a folder anyone may have written: it is checked against the trial
it would resume before anything of it is used, and its optimizer is put in this run's step mode.

A state that does not fit (other optimizer settings than the trial's config, counters outside the run, a part
missing, weights of another network, an optimizer state of other shapes or of non-finite numbers, a step count
that is not the steps the counters took, a position inside an epoch that does not fit it) is treated like a torn
file: train.py tries an older state, or starts the trial afresh, with one line in the trial's log. The state is
used whole or not at all: never its weights with another state's position.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickletools
import re
import stat
import tempfile
import time
from pathlib import Path

import torch

from .settings import METRIC, OPTIMIZERS
from .storage import brief  # a state's values in a line: bounded, whatever they hold

PARTS = ("model", "optimizer", "generator", "torch_rng", "counters")
# Settings of a param group that say how the optimizer computes, not what: they may differ between two runs of
# one trial (`capturable` follows the step mode; the others torch picks per device and version).
HOW_IT_RUNS = ("params", "capturable", "foreach", "fused", "differentiable")


def state_problem(trainer, best, cfg: dict, model: torch.nn.Module, train_images: int) -> str | None:
    """Why `trainer` (and the best weights beside it) cannot resume the trial of `cfg` on `train_images` training
    images, whose fresh network is `model`; None where it fits."""
    if not isinstance(trainer, dict):
        return f"it holds a {type(trainer).__name__}; allowed: a mapping of {', '.join(PARTS)}"
    missing = [p for p in PARTS if p not in trainer]
    if missing:
        return f"{missing[0]!r} is missing"
    if problem := _odd_tensor({"its": trainer, "the best weights'": best}):
        return problem
    for what, weights in (("its weights", trainer["model"]), ("the best weights", best)):
        if problem := _weights_problem(weights, model.state_dict()):
            return f"{what}: {problem}"
    if not all(isinstance(trainer[k], torch.Tensor) for k in ("generator", "torch_rng")):
        return "a random generator's state is not a tensor"
    try:
        for k in ("generator", "torch_rng"):
            torch.Generator().set_state(trainer[k])  # one this torch takes: its size, a valid mt19937 state
    except (RuntimeError, TypeError) as exc:
        return f"a random generator's state: {exc}"[:200]
    if problem := _counters_problem(trainer["counters"], cfg) or _optimizer_problem(trainer["optimizer"], cfg):
        return problem
    position = trainer.get("position")
    if position is not None:
        if not isinstance(position, dict):
            return "its position inside an epoch is not a mapping"
        if (problem := position_problem(position, train_images, cfg["batch_size"])) is not None:
            return f"its position inside an epoch: {problem}"
        if position.get("epoch") != (after := trainer["counters"]["epoch"] + 1):
            return (
                f"its position is in epoch {brief(position.get('epoch'))}; allowed: the one after its counters, {after}"
            )
    steps = trainer["counters"]["epoch"] * len(epoch_batches(train_images, cfg["batch_size"], 0))
    steps += position["steps"] if position is not None else 0
    return _optimizer_state_problem(trainer["optimizer"], cfg, [p.shape for p in model.parameters()], steps)


def _odd_tensor(value) -> str | None:
    """The first tensor in `value` (through mappings and lists) that is not plain numbers on the CPU: sparse, meta,
    nested, quantized, or with elements sharing memory (a stride of 0). torch.load takes each, and the checks below
    or the optimizer's first step would raise on it. Each container is looked into once: a state may reference one
    from many places, or from inside itself."""
    todo, seen = [(value, "")], set()
    while todo:
        value, where = todo.pop()
        if isinstance(value, torch.Tensor):
            plain = value.layout == torch.strided and not (value.is_nested or value.is_meta or value.is_quantized)
            if plain and value.device.type == "cpu" and _dense(value):
                continue
            kind = "meta" if value.is_meta else f"{str(value.layout).split('.')[-1]} on {value.device.type}"
            return f"{where} is a {kind} tensor with strides {value.stride() if plain else '-'}; allowed: dense numbers"
        if isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            todo += [
                (item, f"{where} {key if isinstance(key, str) else brief(key)}".strip())
                for key, item in reversed(items)
            ]
    return None


def _dense(t: torch.Tensor) -> bool:
    """Each element in memory of its own, as every tensor a trial saves is (its conv weights may be channels-last)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _weights_problem(weights, model_state: dict) -> str | None:
    if not isinstance(weights, dict) or set(weights) != set(model_state):
        return "not the tensors of this trial's network"
    for name, tensor in model_state.items():
        if not isinstance(weights[name], torch.Tensor) or weights[name].shape != tensor.shape:
            shape = tuple(weights[name].shape) if isinstance(weights[name], torch.Tensor) else weights[name]
            return f"{name} has shape {shape}; allowed: {tuple(tensor.shape)}"
        if weights[name].dtype != tensor.dtype:
            return f"{name} is {weights[name].dtype}; allowed: {tensor.dtype}"
        if weights[name].is_floating_point() and not torch.isfinite(weights[name]).all():
            return f"{name} holds a number that is not finite"  # it would train on as a 'diverged' run
    return None


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _counters_problem(counters, cfg: dict) -> str | None:
    """A resume state is written after an epoch that did not end the run: its epoch lies in 0..epochs-1 and its
    epochs without improvement below the patience."""
    if not isinstance(counters, dict):
        return "its counters are not a mapping"
    epochs, patience = cfg["epochs"], cfg["patience"]
    epoch = counters.get("epoch")
    if not (_whole(epoch) and 0 <= epoch < epochs):
        return f"epoch {brief(epoch)}; allowed: a whole number 0..{epochs - 1}"
    checks = {
        "best_epoch": (lambda v: _whole(v) and 0 <= v <= epoch, f"0..{epoch}"),
        "epochs_since_best": (lambda v: _whole(v) and 0 <= v <= min(epoch, patience - 1), f"0..{patience - 1}"),
        "best_val_acc": (lambda v: _number(v) and -1 <= v <= 100, "-1..100"),
        "train_time_s": (lambda v: _number(v) and v >= 0, ">= 0"),
        "eval_time_s": (lambda v: _number(v) and v >= 0, ">= 0"),
    }
    for key, (test, allowed) in checks.items():
        if not test(counters.get(key)):
            return f"{key} {brief(counters.get(key, 'missing'))}; allowed: {allowed}"
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optimizer_problem(state, cfg: dict) -> str | None:
    """One param group whose settings equal those the trial's config gives its optimizer (the learning rate,
    OPTIMIZERS' settings and torch's defaults). A setting this torch does not know it ignores: one written by
    another version of torch is passed over."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return "its optimizer state is not what an optimizer's state_dict holds"
    if len(state["param_groups"]) != 1 or not isinstance(state["param_groups"][0], dict):
        return f"{len(state['param_groups'])} optimizer param groups; allowed: 1"
    group = state["param_groups"][0]
    expected = expected_group(cfg)
    for key, value in group.items():
        if key in HOW_IT_RUNS or key not in expected:
            continue
        if not _same(value, expected[key]):
            return f"optimizer {key} {brief(value)}; this trial's config gives {expected[key]!r}"
    for key in ("lr", *OPTIMIZERS[cfg["optimizer"]][1]):
        if key not in group:
            return f"optimizer setting {key!r} is missing"
    return None


# Per-parameter optimizer state that is a sum of squares: never negative.
SQUARES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")


def _optimizer_state_problem(state: dict, cfg: dict, shapes: list, steps: int) -> str | None:
    """Each parameter's optimizer state as this trial's optimizer makes it after `steps` steps: the parameters
    numbered 0..n-1 in one group; no state before the first step, and after it, for every parameter, the keys
    torch's optimizer keeps (a step count equal to `steps`, float tensors of the parameter's shape, finite, sums of
    squares not negative). Anything else would raise inside torch or train on from numbers no run produced."""
    if state["param_groups"][0].get("params") != list(range(len(shapes))):
        return f"its param group does not number this network's {len(shapes)} parameters 0..{len(shapes) - 1}"
    per_param = state.get("state")
    if not isinstance(per_param, dict):
        return "its per-parameter state is not a mapping"
    keys = _state_keys(cfg) if steps else set()
    if steps and set(per_param) != set(range(len(shapes))) or not steps and per_param:
        return f"per-parameter state for {len(per_param)} parameters; allowed: {len(shapes) if steps else 0}"
    for index, entry in per_param.items():
        shape = tuple(shapes[index])
        if not isinstance(entry, dict) or set(entry) != keys:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            return f"parameter {index}'s optimizer state holds {found}; allowed: {sorted(keys)}"
        for key, value in entry.items():
            if key == "step":
                step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if not (_number(step) and step == steps):
                    return f"parameter {index}'s step {brief(step)}; the counters give {steps}"
            elif not (isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                return f"parameter {index}'s {key} is {got}; allowed: float numbers of shape {shape}"
            elif not torch.isfinite(value).all():
                return f"parameter {index}'s {key} holds a number that is not finite"
            elif key in SQUARES and (value < 0).any():
                return f"parameter {index}'s {key} holds a negative number; allowed: >= 0 (a sum of squares)"
    return None


def _state_keys(cfg: dict) -> set:
    """The keys of a parameter's state in the trial's optimizer after a step, as this torch makes them."""
    from .train import make_optimizer

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(cfg["optimizer"], [param], cfg["lr"])
    param.grad = torch.ones(1)
    optimizer.step()
    return set(optimizer.state[param])


def position_problem(p: dict, n: int, batch_size: int) -> str | None:
    """Why a position saved inside an epoch cannot continue a pass over `n` images (None if it can): its order
    must be a permutation of this data, its counters must fall on a step of it, and its running sums must be ones
    those steps could make: a loss sum finite and not negative (zero before the first step; a cross-entropy has no
    tighter bound than its logits' range), a correct count a whole number up to the images seen."""
    try:
        order, chunk, first, start, seen, steps = (p[k] for k in ("order", "chunk", "first", "start", "seen", "steps"))
        if not (isinstance(order, torch.Tensor) and order.dtype == torch.int64 and order.shape == (n,)):
            return f"its order is not one of {n} images"
        if not torch.equal(order.sort().values, torch.arange(n)):
            return "its order is not a permutation of the data"
        if not all(_whole(v) for v in (chunk, first, start, seen, steps)):
            return "its counters are not integers"
        if chunk < batch_size or chunk % batch_size or first % chunk or not 0 <= first < n:
            return f"chunk {chunk} and first image {first} do not fit batches of {batch_size}"
        if (
            start % batch_size
            or not 0 <= start < chunk
            or seen != first + start
            or steps * batch_size != seen
            or seen > n
        ):
            return f"step {steps} at image {seen} does not fall on a step of this epoch"
        loss_sum, correct = p["loss_sum"], p["correct"]
        if not (isinstance(loss_sum, torch.Tensor) and loss_sum.shape == () and loss_sum.is_floating_point()):
            return "loss_sum is not one float number"
        if not (torch.isfinite(loss_sum).all() and loss_sum.item() >= 0 and (seen or loss_sum.item() == 0)):
            return f"loss_sum {loss_sum.item()!r}; allowed: finite, >= 0, 0 before the first step"
        if not (isinstance(correct, torch.Tensor) and correct.shape == () and correct.dtype == torch.int64):
            return "correct is not one whole number"
        if not 0 <= correct.item() <= seen:
            return f"correct {correct.item()}; allowed: 0..{seen} (the images seen)"
        if not (_number(p["train_s"]) and p["train_s"] >= 0):
            return f"train_s {p['train_s']!r}; allowed: finite, >= 0"
        if not (isinstance(p["chunk_gen"], torch.Tensor) and p["chunk_gen"].dtype == torch.uint8):
            return "its generator state is not one"
        torch.Generator().set_state(p["chunk_gen"])  # one this torch takes (size, and a valid mt19937 state)
    except (KeyError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def epoch_batches(images: int, batch_size: int, seen: int) -> list[int]:
    """The batches of a chunk of `images`, `seen` images into the epoch: a last batch of one is left out (it
    breaks BatchNorm; the study's loader never made one) unless it is the epoch's only image."""
    sizes = []
    for start in range(0, images, batch_size):
        size = min(batch_size, images - start)
        if size < 2 and seen + start:
            break
        sizes.append(size)
    return sizes


def expected_group(cfg: dict) -> dict:
    """The param group settings of the trial's optimizer, as torch makes them (its defaults included)."""
    from .train import make_optimizer

    optimizer = make_optimizer(cfg["optimizer"], [torch.nn.Parameter(torch.zeros(1))], cfg["lr"])
    return optimizer.state_dict()["param_groups"][0]


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # this package never writes a tensor setting
        return False
    return a == b


def in_step_mode(state: dict, capturable: bool) -> dict:
    """The optimizer state with `capturable` set for this run's step mode. Optimizer.load_state_dict keeps the
    saved groups' flag; with it, it puts Adam's and RMSprop's step counts on the parameters' device (a captured
    graph needs them there) or, without it, leaves them where they were loaded: on the CPU, where the eager step
    reads them without a device sync."""
    groups = [{**g, "capturable": capturable} if "capturable" in g else g for g in state["param_groups"]]
    return {**state, "param_groups": groups}


# --- the experiment state ------------------------------------------------------------------------------------
# Tune writes its experiment state (experiment_state-<time>.json: which trials exist, with their configs and
# checkpoints) whole into a staging folder, then copies it into a local experiment folder by truncating the file
# there and writing it again. A kill in that moment (SIGKILL, the OOM killer, a power cut) leaves it empty, and the
# sweep cannot be resumed. So each state Tune stages is also copied, atomically, beside it; a resume puts that copy
# back in place of a cut state. (Tune deletes the checkpoints an older state names: only the state being written
# will do, which is why the copy is taken from the staging folder, as Tune saves, not from the experiment folder.)
STATE_COPIES = ".tune-alexnet-state"  # in a local experiment folder
CHECKPOINT_FOLDER = re.compile(r"checkpoint_(\d+)")  # Tune's name for a trial's checkpoints, numbered
RESULT_ROW_BYTES = 1 << 20  # the longest line of a trial's result.json a mend reads as one
RESULT_NUMBER_LIMIT = 1e12  # above any iteration count, time in seconds or rank a sweep reports


def _newest(folder: str, prefix: str) -> str | None:
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json"))
    return os.path.join(folder, names[-1]) if names else None  # Tune reads the newest, by the time in its name


def _newest_state(folder: str) -> str | None:
    return _newest(folder, EXPERIMENT_STATE)


def _parses(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):  # not JSON, or nested beyond Python's stack
        return False


def _whole_pickle(raw: bytes) -> bool:
    """Read op by op, none of it run: a cut or empty pickle has no STOP."""
    try:
        return bool(raw) and list(pickletools.genops(io.BytesIO(raw)))[-1][0].name == "STOP"
    except Exception:  # pickletools' ValueError for a cut stream, others for garbage
        return False


# What Tune saves as it goes, each written the same way (truncated, then written again), and how a whole one reads:
# the experiment state (JSON), and its search algorithm's state (a pickle, named .json), which Tune's restore loads
# first: cut, the restore starts the search afresh, with trials of empty configs.
EXPERIMENT_STATE, SEARCH_STATE = "experiment_state-", "basic-variant-state-"
STATE_FILES = {EXPERIMENT_STATE: _parses, SEARCH_STATE: _whole_pickle}


def keep_whole_state(staging_dir: str, exp_dir: str) -> None:
    """Copy the newest of each state Tune staged in `staging_dir` into `exp_dir`/STATE_COPIES, atomically, as the
    only copy of its kind there. Called as Tune saves (sweep.KeepWholeState), when the staged files are whole."""
    for prefix, whole in STATE_FILES.items():
        try:
            path = _newest(staging_dir, prefix)
            if path is None:
                continue
            with open(path, "rb") as f:
                raw = f.read()
            if not whole(raw):
                continue
            copies = os.path.join(exp_dir, STATE_COPIES)
            os.makedirs(copies, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=copies, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, os.path.join(copies, os.path.basename(path)))
            for name in os.listdir(copies):  # one copy of each kind: of the state Tune would read
                if name.startswith(prefix) and name != os.path.basename(path):
                    os.unlink(os.path.join(copies, name))
        except OSError:  # a full or vanishing folder: the sweep's own checks say so; the copy waits for the next save
            return


def _replace(path: str, raw: bytes) -> None:
    """Tune's file at `path` replaced by `raw` atomically, with the mode of the file it replaces (Tune's: 0644)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tune-alexnet-state-")
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(tmp, os.stat(path).st_mode & 0o777)
    os.replace(tmp, path)


def point_at_kept_checkpoints(exp_dir: str) -> str | None:
    """Tune saves its experiment state every few seconds but deletes a replaced checkpoint at once: a kill between
    the two leaves a state naming a checkpoint that is gone, and Tune's restore of that trial fails at every
    --resume. Point each such trial at its newest checkpoint still in its folder (none: it starts afresh), in the
    state Tune will read, atomically; one line saying so, None where every named checkpoint is there."""
    path = _newest_state(exp_dir)
    if path is None:
        return None
    with open(path, "rb") as f:
        state = json.loads(f.read())
    mended = [m for pair in state.get("trial_data", []) if (m := _repoint(pair, exp_dir))]
    if not mended:
        return None
    _replace(path, json.dumps(state).encode())
    return (
        f"the experiment state {os.path.basename(path)} names checkpoints some trials no longer have (the sweep "
        f"was killed between saving the two, or they were removed); those trials go on from their newest kept "
        f"checkpoint: {'; '.join(mended)}"
    )


def _repoint(pair: list, exp_dir: str) -> str | None:
    """One trial's [trial, run metadata] JSON pair mended in place; what was done, None where nothing was (or the
    pair is not what Tune writes: Tune's own restore then says what is wrong with it)."""
    from ray.train._internal.checkpoint_manager import _insert_into_sorted_list
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    from .storage import plain_name

    try:
        trial, meta = json.loads(pair[0]), json.loads(pair[1])
        if trial.get("status") == "TERMINATED":  # never restored: its tables say what it left
            return None
        storage, manager = _unpickled(trial["storage"]), _unpickled(meta["checkpoint_manager"])
        was, here = storage.trial_fs_path, os.path.join(exp_dir, storage.trial_dir_name)
        if not plain_name(storage.trial_dir_name) or os.path.islink(here):  # nothing written outside the experiment
            return None

        def kept(result) -> bool:  # where the trial folder is now (Tune re-roots its checkpoints the same way)
            return os.path.isdir(os.path.join(here, os.path.relpath(result.checkpoint.path, was)))

        latest, results = manager.latest_checkpoint_result, manager._checkpoint_results
        ended = _final_after(here, latest, trial.get("config"))
        if (latest is None or kept(latest)) and all(kept(r) for r in results) and not ended:
            return None
        manager._checkpoint_results = [r for r in results if kept(r)]  # Tune would fail deleting one that is gone
        if ended or (latest is not None and not kept(latest)):
            manager._latest_checkpoint_result = None
            score = manager.checkpoint_config.checkpoint_score_attribute
            newest, metrics, rows_lost = _newest_checkpoint(here, score, trial)
            if newest is not None:
                if score:
                    metrics.setdefault(score, float("-inf"))  # below any reported one: replaced by the next
                # Tune takes a trial's last result from the checkpoint it restores, and a trial that had ended
                # reports nothing more: without the metric, Tune's check of that result stops the whole sweep.
                metrics.setdefault(METRIC, math.nan)
                at = Checkpoint(path=os.path.join(was, newest), filesystem=storage.storage_filesystem)
                manager._latest_checkpoint_result = _TrainingResult(checkpoint=at, metrics=metrics)
                if not any(os.path.basename(r.checkpoint.path) == newest for r in manager._checkpoint_results):
                    _insert_into_sorted_list(
                        manager._checkpoint_results, manager.latest_checkpoint_result, manager._get_checkpoint_score
                    )
            # Tune numbers its next checkpoint on from this index: never over anything of that name.
            storage.current_checkpoint_index = max(_checkpoint_numbers(here), default=-1)
            said = f"{trial['trial_id']} from {newest}" if newest else f"{trial['trial_id']} afresh, none is left"
            said += ", its final one: it had ended" if ended else ""
            said += " (the results of its last epochs before it were not saved)" if rows_lost else ""
        else:
            said = f"{trial['trial_id']} from {os.path.basename(latest.checkpoint.path)}"
        trial["storage"], meta["checkpoint_manager"] = _pickled(storage), _pickled(manager)
        pair[0], pair[1] = json.dumps(trial), json.dumps(meta)
        return said
    except Exception:
        return None


def _final_after(trial_dir: str, latest, config) -> bool:
    """Whether the trial's newest checkpoint is a final one newer than the `latest` Tune's state records: a kill
    just after the trial's last report, before Tune saved its state. Left so, the resume would train the trial
    again from the recorded one (a checkpoint newer than Tune's record is taken only as a stop's state)."""
    numbers = [n for n in _checkpoint_numbers(trial_dir) if _complete(os.path.join(trial_dir, _folder(n)))]
    recorded = CHECKPOINT_FOLDER.fullmatch(os.path.basename(latest.checkpoint.path)) if latest is not None else None
    if not numbers or (recorded and max(numbers) <= int(recorded[1])):
        return False
    return _whole_final(os.path.join(trial_dir, _folder(max(numbers))), config) is not None


def _folder(number: int) -> str:
    """Tune's name for its checkpoint of that index, as Tune makes it (ray_hooks names the next one so too)."""
    from ray.train._internal.storage import StorageContext

    return StorageContext._make_checkpoint_dir_name(number)


def _unpickled(blob: dict):
    """An object Tune stored in its state JSON as a hex cloudpickle, as Tune's own restore reads it."""
    from ray import cloudpickle
    from ray._common.utils import hex_to_binary

    return cloudpickle.loads(hex_to_binary(blob["value"]))


def _pickled(obj) -> dict:
    from ray.tune.utils.serialization import TuneFunctionEncoder

    return TuneFunctionEncoder()._to_cloudpickle(obj)


def _checkpoint_numbers(trial_dir: str) -> list[int]:
    names = os.listdir(trial_dir) if os.path.isdir(trial_dir) else ()
    return [int(m[1]) for n in names if (m := CHECKPOINT_FOLDER.fullmatch(n))]


def _newest_checkpoint(trial_dir: str, score: str | None, trial: dict) -> tuple[str | None, dict, bool]:
    """The trial's newest checkpoint folder that holds one of ours, the numbers Tune recorded with it (its
    iteration, time, `score` and the metric), and whether its result (with those of the epochs before it) never
    reached the trial's result.json: Tune writes those at its state saves. A final checkpoint's missing result is
    written back (`_final_row`): the trial reports nothing more, and the tables read how it ended from that row."""
    from .storage import RESULT_FILE

    names = [_folder(i) for i in sorted(_checkpoint_numbers(trial_dir))]
    names = [n for n in names if _complete(os.path.join(trial_dir, n))]
    if not names:
        return None, {}, False
    last, match, last_epoch = {}, None, 0  # last_epoch: of the last row that has one (a stop's row has none)
    with contextlib.suppress(OSError), open(os.path.join(trial_dir, RESULT_FILE), "rb") as f:
        for line in iter(lambda: f.readline(RESULT_ROW_BYTES), b""):  # a longer line: pieces that do not parse
            with contextlib.suppress(ValueError, RecursionError):
                if isinstance(row := json.loads(line), dict):
                    last = row
                    match = row if row.get("checkpoint_dir_name") == names[-1] else match
                    last_epoch = row["epoch"] if type(row.get("epoch")) is int else last_epoch

    def pick(row: dict) -> dict:  # result.json is data anyone may have written: only numbers Tune could have put
        kinds = {"training_iteration": (int,), "time_total_s": (int, float), score: (int, float)}
        picked = {
            k: row[k]
            for k, allowed in kinds.items()
            if type(row.get(k)) in allowed and math.isfinite(row[k]) and 0 <= row[k] <= RESULT_NUMBER_LIMIT
        }
        if type(row.get(METRIC)) is float and abs(row[METRIC]) <= RESULT_NUMBER_LIMIT:  # an accuracy, tie-broken
            picked[METRIC] = row[METRIC]
        return picked

    if match is not None:
        return names[-1], pick(match), False
    final = _final_row(trial_dir, names[-1], last, last_epoch, trial)
    if final is not None:
        return names[-1], pick(final), last_epoch < final["epoch"] - 1
    # The next results number on from the last one recorded; the checkpoint ranks below any reported one.
    return names[-1], {k: v for k, v in pick(last).items() if k != score}, True


def _final_row(trial_dir: str, name: str, last: dict, before: int, trial: dict) -> dict | None:
    """Where the newest checkpoint is the trial's final one and its epoch has no row in result.json: that row,
    rebuilt from the checkpoint's counters and appended to result.json; None where there is nothing to rebuild
    (also where the counters would make a row the tables refuse). How the epoch ran (its losses, the device) is
    not in a checkpoint: the row leaves those out rather than guess them."""
    from .checkpoint import KIND_FINAL
    from .export import line_problem, score
    from .grid import run_number
    from .storage import RESULT_FILE
    from .train import NEW_COUNTERS

    progress = _whole_final(os.path.join(trial_dir, name), trial.get("config"))
    if progress is None:
        return None
    row = {k: progress.get(k) for k in NEW_COUNTERS}
    iteration = last.get("training_iteration") if type(last.get("training_iteration")) is int else 0
    if row["epoch"] <= before or line_problem(row):
        return None  # the row is there (or the counters are not a final epoch's): nothing to rebuild
    try:
        run = run_number(trial["config"])
    except (KeyError, TypeError):  # no config in the state, or one off the study's types
        run = None
    row |= {
        "diverged": progress.get("diverged") is True, "checkpoint_kind": KIND_FINAL, "ends_trial": True,
        METRIC: score(row["best_val_acc"] if row["best_epoch"] else None, run, trial.get("trial_id")),
        "checkpoint_dir_name": name, "training_iteration": min(max(iteration, 0), 10**9) + 1,
        "trial_id": trial.get("trial_id"), "rebuilt_from_checkpoint": True,
    }  # fmt: skip
    try:
        fd = os.open(os.path.join(trial_dir, RESULT_FILE), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:  # a link (never followed), or not writable: the row stays lost, and the line says so
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would carry the row to another name
            return None
        ends_whole = st.st_size == 0 or os.pread(fd, 1, st.st_size - 1) == b"\n"
        os.write(fd, (b"" if ends_whole else b"\n") + json.dumps(row).encode() + b"\n")  # after a cut line
        os.fsync(fd)
    finally:
        os.close(fd)
    return row


def _whole_final(folder: str, config) -> dict | None:
    """The counters of a final checkpoint that ends the trial of `config` and is whole (its weights and their
    arguments there, no resume state): one half-copied by a kill, or edited, is not taken as the trial's end, so
    the trial trains on from the one before. None where it is not such a checkpoint."""
    from .checkpoint import KIND_FINAL, TRAINER_FILE, read_progress
    from .train import run_ended

    progress = read_progress(Path(folder)) if _complete(folder) else None
    if not progress or progress.get("kind") != KIND_FINAL or os.path.lexists(os.path.join(folder, TRAINER_FILE)):
        return None
    try:
        return progress if type(progress.get("epoch")) is int and run_ended(progress, config) else None
    except (KeyError, TypeError):  # a config without epochs or patience: nothing to check the counters by
        return None


def _complete(folder: str) -> bool:
    """Whether a checkpoint folder holds what every checkpoint of ours does, each a regular file that is not
    empty: Tune copies a checkpoint's files in parallel, and a kill in the middle leaves some."""
    from .checkpoint import MODEL_ARGS_FILE, MODEL_FILE, PROGRESS_FILE

    def regular(name: str) -> bool:
        with contextlib.suppress(OSError):
            st = os.lstat(os.path.join(folder, name))
            return stat.S_ISREG(st.st_mode) and st.st_size > 0
        return False

    return all(map(regular, (PROGRESS_FILE, MODEL_FILE, MODEL_ARGS_FILE)))


def end_cut_result_lines(exp_dir: str) -> str | None:
    """End each trial's result.json that a kill cut inside a line with a newline: Tune appends a resumed trial's
    results to it, and the first would be glued onto the cut line, both lost to every reader. One line saying
    so, None where no file was cut."""
    from .export import TRIAL_PREFIX
    from .storage import RESULT_FILE

    cut = []
    for entry in sorted(os.scandir(exp_dir), key=lambda e: e.name):
        path = os.path.join(entry.path, RESULT_FILE)
        if not entry.name.startswith(TRIAL_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
            try:
                st = os.fstat(fd)  # a hard link would carry the newline to another name
                size = st.st_size if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else 0
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    os.write(fd, b"\n")
                    cut.append("_".join(entry.name.split("_")[2:4]))  # its trial id
            finally:
                os.close(fd)
    if not cut:
        return None
    return f"the last result line of trial(s) {', '.join(cut)} was cut by the kill; it is passed over"


def cut_search_state(exp_dir: str) -> str | None:
    """The newest search state, where it is cut and no whole copy of it was kept to put back; None where it is
    whole, absent, or can be mended. Reads only."""
    path = _newest(exp_dir, SEARCH_STATE)
    return path if path and _in_use(exp_dir, SEARCH_STATE) is None else None


def _in_use(exp_dir: str, prefix: str) -> tuple[str, bytes, str | None] | None:
    """(path, bytes, the kept copy they come from or None) of the newest state of that kind as Tune will read it
    once mended: the file where whole, else its kept whole copy; None where there is neither."""
    path = _newest(exp_dir, prefix)
    for candidate in (path, os.path.join(exp_dir, STATE_COPIES, os.path.basename(path))) if path else ():
        with contextlib.suppress(OSError), open(candidate, "rb") as f:
            if STATE_FILES[prefix](raw := f.read()):
                return path, raw, None if candidate == path else candidate
    return None


def state_is_whole(exp_dir: str) -> bool:
    """Whether the newest experiment state is whole as it lies (none at all counts as whole: nothing to put back)."""
    found = _in_use(exp_dir, EXPERIMENT_STATE)
    return (found[2] is None) if found else _newest(exp_dir, EXPERIMENT_STATE) is None


TUNER_KEYS = ("_tuner_kwargs", "_tune_config", "_run_config")  # what Tune's restore takes from tuner.pkl
SEARCH_KEYS = ("_iterators", "_uuid_prefix", "_total_samples", "_finished")  # and from its search state


def tune_state_problem(exp_dir: str) -> str | None:
    """What in Tune's state, whole yet not what Tune writes, would make its restore fail with a traceback, start
    trials of empty configs in place of the experiment's, or write a trial outside the experiment; None where
    nothing. Run on an experiment only this user can write, whose pickles Tune's restore unpickles anyway."""
    from ray import cloudpickle

    from .storage import plain_name

    tuner = os.path.join(exp_dir, "tuner.pkl")
    try:
        with open(tuner, "rb") as f:
            record = cloudpickle.loads(f.read())
    except FileNotFoundError:
        record = {key: {} for key in TUNER_KEYS}  # Tune says so itself
    except Exception as exc:  # noqa: BLE001 - a whole pickle of what this Ray cannot load
        return f"{tuner} cannot be loaded ({type(exc).__name__})"
    if not (
        isinstance(record, dict) and all(k in record for k in TUNER_KEYS) and isinstance(record[TUNER_KEYS[0]], dict)
    ):
        return f"{tuner} holds {_kind(record)}, not Tune's record of a sweep"
    found = _in_use(exp_dir, SEARCH_STATE)
    if found:
        try:
            search = cloudpickle.loads(found[1])
        except Exception as exc:  # noqa: BLE001
            return f"{found[0]} cannot be loaded ({type(exc).__name__})"
        if not (isinstance(search, dict) and all(k in search for k in SEARCH_KEYS)):
            return f"{found[0]} holds {_kind(search)}, not Tune's record of its search"
    found = _in_use(exp_dir, EXPERIMENT_STATE)
    if not found:
        return None  # cut with no copy, or none: the checks before this one, or Tune's restore, say so
    path, entries = found[0], json.loads(found[1]).get("trial_data")
    if not isinstance(entries, list):
        return f"{path} holds no list of trials"
    reported = sum(1 for p in Path(exp_dir).glob("*/result.json") if p.is_file() and p.stat().st_size)
    if not entries and reported:
        return f"{path} names no trials, yet {reported} trial folder(s) hold results"
    seen: set = set()
    for number, pair in enumerate(entries, 1):
        try:
            trial = json.loads(pair[0])
            folder = _unpickled(trial["storage"]).trial_dir_name
            names = {("id", trial["trial_id"]), ("folder", folder)}
        except Exception as exc:  # noqa: BLE001 - anything but Tune's [trial, metadata] JSON pair
            return f"{path}: trial {number}'s entry cannot be read ({type(exc).__name__})"
        if not plain_name(folder):
            return f"{path}: trial {trial.get('trial_id')!r} names the folder {folder!r}, outside the experiment"
        if twice := seen & names:  # two trials in one folder, or of one id: Tune waits on one of them for ever
            kind, name = max(twice)  # its id first: the folder follows from it
            return f"{path}: two trials name the {'trial id' if kind == 'id' else 'folder'} {name!r}"
        seen |= names
    return None


def _kind(value) -> str:
    return f"a {type(value).__name__}" + (f" of {len(value)} item(s)" if isinstance(value, (dict, list)) else "")


def put_back_whole_state(exp_dir: str) -> str | None:
    """Where the newest experiment state, or search state, is cut (not whole) and a whole copy of it was kept: put
    the copy in its place (atomically) and say so in one line; None where there was nothing to mend."""
    said = []
    for prefix in STATE_FILES:
        found = _in_use(exp_dir, prefix)
        if found is None or found[2] is None:  # none, whole as it lies, or no whole copy to put back
            continue
        path, raw, copy = found
        _replace(path, raw)
        when = time.strftime("%H:%M:%S", time.localtime(os.stat(copy).st_mtime))
        kind = "experiment state" if prefix == EXPERIMENT_STATE else "search state"
        said.append(f"the {kind} {os.path.basename(path)} was cut short (the sweep was killed while Tune wrote it); "
                    f"its last whole copy, from {when}, is put back")  # fmt: skip
    return "; ".join(said) + ": trials go on from their newest checkpoints" if said else None
