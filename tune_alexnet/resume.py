"""A resume state (`trainer.pt`) is data from a folder anyone may have written: it is checked against the trial
it would resume before anything of it is used, and its optimizer is put in this run's step mode.

A state that does not fit (other optimizer settings than the trial's config, counters outside the run, a part
missing, weights of another network) is treated like a torn file: train.py tries an older state, or starts the
trial afresh, with one line in the trial's log.
"""

from __future__ import annotations

import math

import torch

from .settings import OPTIMIZERS

PARTS = ("model", "optimizer", "generator", "torch_rng", "counters")
# Settings of a param group that say how the optimizer computes, not what: they may differ between two runs of
# one trial (`capturable` follows the step mode; the others torch picks per device and version).
HOW_IT_RUNS = ("params", "capturable", "foreach", "fused", "differentiable")


def state_problem(trainer, best, cfg: dict, model_state: dict) -> str | None:
    """Why `trainer` (and the best weights beside it) cannot resume the trial of `cfg`, whose fresh network's
    state_dict is `model_state`; None where it fits."""
    if not isinstance(trainer, dict):
        return f"it holds a {type(trainer).__name__}; allowed: a mapping of {', '.join(PARTS)}"
    missing = [p for p in PARTS if p not in trainer]
    if missing:
        return f"{missing[0]!r} is missing"
    for what, weights in (("its weights", trainer["model"]), ("the best weights", best)):
        if problem := _weights_problem(weights, model_state):
            return f"{what}: {problem}"
    if not all(isinstance(trainer[k], torch.Tensor) for k in ("generator", "torch_rng")):
        return "a random generator's state is not a tensor"
    return _counters_problem(trainer["counters"], cfg) or _optimizer_problem(trainer["optimizer"], cfg)


def _weights_problem(weights, model_state: dict) -> str | None:
    if not isinstance(weights, dict) or set(weights) != set(model_state):
        return "not the tensors of this trial's network"
    for name, tensor in model_state.items():
        if not isinstance(weights[name], torch.Tensor) or weights[name].shape != tensor.shape:
            shape = tuple(weights[name].shape) if isinstance(weights[name], torch.Tensor) else weights[name]
            return f"{name} has shape {shape}; allowed: {tuple(tensor.shape)}"
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
        return f"epoch {epoch!r}; allowed: a whole number 0..{epochs - 1}"
    checks = {
        "best_epoch": (lambda v: _whole(v) and 0 <= v <= epoch, f"0..{epoch}"),
        "epochs_since_best": (lambda v: _whole(v) and 0 <= v <= min(epoch, patience - 1), f"0..{patience - 1}"),
        "best_val_acc": (lambda v: _number(v) and -1 <= v <= 100, "-1..100"),
        "train_time_s": (lambda v: _number(v) and v >= 0, ">= 0"),
        "eval_time_s": (lambda v: _number(v) and v >= 0, ">= 0"),
    }
    for key, (test, allowed) in checks.items():
        if not test(counters.get(key)):
            return f"{key} {counters.get(key, 'missing')!r}; allowed: {allowed}"
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
            return f"optimizer {key} {value!r}; this trial's config gives {expected[key]!r}"
    for key in ("lr", *OPTIMIZERS[cfg["optimizer"]][1]):
        if key not in group:
            return f"optimizer setting {key!r} is missing"
    return None


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
