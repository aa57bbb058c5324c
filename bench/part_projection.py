"""Part (e) of bench/device.py: the wall time of all 108 study runs on this card, from this call's measurements.

At the default share (settings.DEFAULT_GPU_SHARE of a GPU a trial: 4 trials at once), with the study's runs split
evenly over its batch sizes and a queue that stays full (the last runs' tail is left out):

    wall = sum over batch sizes (runs at that size x epochs a run x seconds an epoch at that size) / trials at once

Seconds an epoch come from (d), where it ran as many runs at once as the default share packs (a whole epoch:
training, the test set and checkpoints; the median over its runs' epochs at each batch size), and from (b) at that
many trials (training alone: trials at once x 50,000 / aggregate img/s), without and with MPS. Epochs a run: the
mean of (d)'s runs where all finished; where some were cut, a lower bound (their epochs so far, plus one); and the
plateau rule's bounds (at least 1 + patience, at most the epoch limit), since the study recorded no run lengths.
A batch size without a measured epoch takes the mean of the others, and says so. This part needs no time of its own.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import device_common as common
from part_fidelity import log_path

from tune_alexnet.data import Cifar
from tune_alexnet.grid import study_config
from tune_alexnet.settings import BATCH_SIZES, DEFAULT_GPU_SHARE, EPOCHS, PATIENCE, Grid

RUNS_PER_BATCH = len(Grid()) // len(BATCH_SIZES)
CONCURRENT = round(1 / DEFAULT_GPU_SHARE)


def project(epoch_s: dict[int, float], epochs: float, concurrent: int) -> tuple[float, str]:
    """Hours for the whole study, and the arithmetic written out. A batch size missing from `epoch_s` takes the
    mean of the others."""
    if not epoch_s:
        raise ValueError("no epoch time measured at any batch size")
    fallback = statistics.fmean(epoch_s.values())
    terms, total = [], 0.0
    for bs in BATCH_SIZES:
        seconds = epoch_s.get(bs, fallback)
        total += RUNS_PER_BATCH * epochs * seconds
        assumed = "" if bs in epoch_s else ", assumed: the mean of the measured sizes"
        terms.append(f"{RUNS_PER_BATCH} runs x {epochs:.1f} epochs a run x {seconds:.2f} s (batch {bs}{assumed})")
    hours = total / concurrent / 3600
    return hours, f"({' + '.join(terms)}) / {concurrent} trials at once = {total / concurrent:,.0f} s = {hours:.2f} h"


def fidelity_epochs(args: argparse.Namespace, workdir: Path) -> tuple[dict[int, float], list[tuple[int, bool]]]:
    """(d)'s median whole-epoch seconds by batch size, and each run's (epochs, finished)."""
    by_batch: dict[int, list[float]] = {}
    lengths = []
    for run in args.runs:
        epochs, end = common.read_log(log_path(workdir, run))
        if not epochs:
            continue
        lengths.append((len(epochs), end["end"] == "finished"))
        whole = [e["train_s"] + e["eval_s"] + e["checkpoint_s"] + e["own_report_s"] for e in epochs]
        by_batch.setdefault(study_config(run)["batch_size"], []).extend(whole)
    return {bs: statistics.median(v) for bs, v in by_batch.items()}, lengths


def packing_epochs(workdir: Path, mps: bool) -> dict[int, float]:
    """(b)'s training seconds of one trial's 50,000-image epoch at the default number of trials at once."""
    points = common.recorded(workdir, "packing").get("points", [])
    return {
        p["batch"]: CONCURRENT * common.STUDY_TRAIN_IMAGES / p["aggregate"]
        for p in points
        if p["k"] == CONCURRENT and p["mps"] == mps and p["aggregate"]
    }


def run_lengths(lengths: list[tuple[int, bool]]) -> list[tuple[float, str]]:
    """(epochs a run, where the number comes from)."""
    out = []
    if lengths and all(done for _, done in lengths):
        out.append((statistics.fmean(n for n, _ in lengths), f"the mean of (d)'s {len(lengths)} finished runs"))
    elif lengths:
        floor = statistics.fmean(n if done else n + 1 for n, done in lengths)
        out.append((floor, "at least: (d)'s runs, a cut one counted at its epochs so far plus one (a lower bound)"))
    out.append((1.0 + PATIENCE, f"the plateau rule's least: 1 + patience {PATIENCE} (a lower bound)"))
    out.append((float(EPOCHS), f"the epoch limit, {EPOCHS} (an upper bound)"))
    return out


def part_projection(data: Cifar, args: argparse.Namespace, deadline: float, workdir: Path) -> str:
    sources, notes = [], []
    fidelity, lengths = fidelity_epochs(args, workdir)
    if fidelity and len(args.runs) == CONCURRENT:
        sources.append(("(d): whole epochs (train, test set, checkpoints)", fidelity))
    elif fidelity:
        notes.append(f"(d) ran {len(args.runs)} runs at once, not {CONCURRENT}: its epoch times are not used.")
    for mps in (False, True):
        if epochs := packing_epochs(workdir, mps):
            sources.append((f"(b), MPS {'on' if mps else 'off'}: training alone", epochs))
    rows = []
    for label, epoch_s in sources:
        for epochs, why in run_lengths(lengths):
            hours, arithmetic = project(epoch_s, epochs, CONCURRENT)
            rows.append([label, f"{epochs:.1f} ({why})", arithmetic, f"{hours:.2f}"])
    if not rows:
        notes.append(f"Not projected: neither (b) nor (d) measured an epoch at {CONCURRENT} trials at once.")
    return "\n".join([
        f"## (e) Projection: all {len(Grid())} study runs on this card",
        "",
        f"Card: {common.card_name()}; width {args.width:g}; at the default share, {DEFAULT_GPU_SHARE:g} GPU a trial "
        f"({CONCURRENT} trials at once), {RUNS_PER_BATCH} runs at each batch size, a queue that stays full. "
        f"Computed from this call's (b) and (d), not measured end to end. " + " ".join(notes),
        "",
        common.markdown(["seconds an epoch from", "epochs a run", "arithmetic", "hours"], rows),
    ])  # fmt: skip
