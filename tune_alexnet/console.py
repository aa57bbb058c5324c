"""What a person sees while a sweep runs: one compact table of the trials at work and a progress line.

Tune's own live output (a wide table without our accuracy, a box per trial) is turned
off; this callback prints, every `every_s` seconds and at the end, the running
trials with their study run number, five settings, epoch and accuracies, and one
line with counts, the best run so far, the elapsed time and a rough time left.
"""

from __future__ import annotations

import sys
import time

from ray import tune

from .grid import full_config, run_number

STATUS = {"RUNNING": "running", "PENDING": "pending", "TERMINATED": "done", "ERROR": "errored", "PAUSED": "paused"}


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def describe_trial(config: dict) -> str:
    c = full_config(config)
    run = run_number(c)
    return (
        f"{'run ' + str(run) if run else 'off-grid'}: {c['optimizer']} lr {c['lr']:g} batch {c['batch_size']} "
        f"{'dropout' if c['dropout'] else 'no dropout'} {'BN' if c['batchnorm'] else 'no BN'}"
    )


def trial_row(trial) -> str:
    c = full_config(trial.config)
    r = trial.last_result or {}
    run = run_number(c)
    acc = f"{r['val_acc']:6.2f}" if "val_acc" in r else "     -"
    best = f"{r['best_val_acc']:6.2f}" if "best_val_acc" in r else "     -"
    return (
        f"{run if run else '-':>4} {c['optimizer']:<8} {c['lr']:<7g} {c['batch_size']:>5} "
        f"{str(c['dropout']).lower():<5} {str(c['batchnorm']).lower():<5} {STATUS.get(trial.status, trial.status):<8} "
        f"{r.get('epoch', 0):>3}/{c.get('epochs', '?'):<3} {acc} {best}"
    )


HEADER = f"{'run':>4} {'optim':<8} {'lr':<7} {'batch':>5} {'drop':<5} {'bn':<5} {'status':<8} {'epoch':>7} {'acc %':>6} {'best %':>6}"


class Console(tune.Callback):
    """Pickled with the experiment (Tune saves its callbacks), so it keeps no stream and no clock of a past run."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {"every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.started = None
        self.last_print = 0.0
        self.done_before = None  # trials already finished when this driver started (a resume)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.started is None:
            self.started = time.monotonic()
        if time.monotonic() - self.last_print >= self.every_s:
            self.show(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.show(trials)

    def show(self, trials: list) -> None:
        self.last_print = time.monotonic()
        running = [t for t in trials if t.status == "RUNNING"]
        lines = [self.progress(trials)]
        if running:
            lines += [HEADER, *(trial_row(t) for t in running)]
        print("\n".join(lines), file=sys.stdout, flush=True)

    def progress(self, trials: list) -> str:
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        if self.done_before is None:
            self.done_before = len(ended)
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        scored = [t for t in trials if (t.last_result or {}).get("best_val_acc") is not None]
        best = max(scored, key=lambda t: t.last_result["best_val_acc"], default=None)
        best_text = (
            f"best {best.last_result['best_val_acc']:.2f}% ({describe_trial(best.config)})"
            if best
            else "best: none yet"
        )
        elapsed = time.monotonic() - (self.started or time.monotonic())
        finished_here = len(ended) - self.done_before
        left = ""
        if finished_here and pending + running:  # rough: the pace so far, applied to what is left
            left = f", ~{duration(elapsed / finished_here * (pending + running))} left"
        return (
            f"[{duration(elapsed)}] {len(ended)}/{len(trials)} done, {running} running, {pending} pending; "
            f"{best_text}{left}"
        )


def summary(table, exp_uri: str, written: list[str]) -> str:
    """The end of a sweep, for a person: the best run, each optimiser's best, counts, and where things are."""
    from .grid import optimizer_order
    from .storage import is_remote

    counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
    scored = table[table["final_accuracy"].notna()]
    lines = [f"tune-alexnet: experiment {exp_uri}: {len(table)} trials ({counts})"]
    if len(scored):
        best = scored.loc[scored["final_accuracy"].idxmax()]
        lines.append(f"  best:   {best['final_accuracy']:.2f}% ({describe_trial(best.to_dict())})")
        for opt in optimizer_order(scored["optimizer"]):
            part = scored[scored["optimizer"] == opt]
            top = part.loc[part["final_accuracy"].idxmax()]
            lines.append(
                f"    {opt:<8} best {top['final_accuracy']:.2f}% of {len(part)} runs ({describe_trial(top.to_dict())})"
            )
        lines.append(f"  best checkpoint: {best['best_checkpoint']}")
    lines.append(f"  table:  {next(p for p in written if 'results.parquet' in p)} (and .csv, epochs.parquet)")
    lines.append(f"  report: {next(p for p in written if 'report.md' in p)}")
    copy = "  (from a local copy of the folder)" if is_remote(exp_uri) else ""
    lines.append(f"  curves: tensorboard --logdir {exp_uri}{copy}")
    return "\n".join(lines)
