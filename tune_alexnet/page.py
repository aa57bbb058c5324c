"""An experiment's tables -> report.html: one self-contained study page that opens from file:// offline.

The page holds the plotting library (plotly.js, embedded once: plotly.min.js, a build of plotly's core with only the
four trace types the page draws, made by tools/plotly/ — a third of the full bundle, so the page opens sooner),
the hand-written glue (page.js: sorting, the
brush that filters the table, the row that highlights its curves, live updates) and the data as JSON that is
never parsed as markup. Beside it, report-data.js holds the same data as one call of the page's update
function: a page left open while the sweep runs re-reads that file every few seconds (a file:// page cannot
fetch) and redraws without losing the reader's sort, brush, highlight or colour choice.

Nothing from the folder runs in the page: table cells are set as text, every string handed to plotly is
HTML-escaped in page.js, the JSON escapes '<', '>' and '&', and a Content-Security-Policy lets only the page's
own scripts run (by hash), and only the scripts those add ('strict-dynamic': the sidecar); no eval, no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
from datetime import UTC, datetime
from importlib import resources

import pandas as pd

from .export import Experiment, best_run, output_dir, shown_path
from .grid import optimizer_order
from .report import reference_table, scored, what_ran
from .settings import DIMENSIONS
from .storage import last_name, without_query

PAGE_NAME = "report.html"
DATA_NAME = "report-data.js"  # the sidecar a live page re-reads; it calls UPDATE_FUNCTION with the data
UPDATE_FUNCTION = "tuneAlexnetUpdate"
POLL_S = 5.0  # how often an open page looks for new data while the sweep runs
PROBLEM_STATUSES = ("errored", "diverged", "lost", "damaged")
# What the page may show of each trial: the table's columns (export.TABLE_SCHEMA) it needs, nothing else.
RUN_FIELDS = {
    "trial_id": "trial",
    "run": "run",
    "optimizer": "optimizer",
    "lr": "lr",
    "batch_size": "batch_size",
    "dropout": "dropout",
    "batchnorm": "batchnorm",
    "seed": "seed",
    "final_accuracy": "acc",
    "epochs_run": "epochs",
    "best_epoch": "best_epoch",
    "max_epochs": "max_epochs",
    "stopped_early": "stopped",
    "status": "status",
    "train_time_s": "train_s",
    "error": "error",
}
CURVE_FIELDS = ("epoch", "val_acc", "train_loss")


# --- tables -> the page's data ----------------------------------------------------------------------------


def page_data(exp: Experiment, live: dict | None = None, poll_s: float = POLL_S) -> dict:
    """Everything the page shows, JSON-ready. `live`: the running sweep's state (running trials, time left);
    None once the sweep has ended (an open page then stops polling)."""
    table, epochs = exp.table, exp.epochs
    ref = reference_table().set_index("run")["final_accuracy"]
    runs = []
    for row in table.to_dict("records"):
        r = {short: _plain(row.get(col)) for col, short in RUN_FIELDS.items()}
        r["orig"] = _plain(ref.get(r["run"])) if r["run"] is not None else None
        r["diff"] = round(r["acc"] - r["orig"], 2) if r["acc"] is not None and r["orig"] is not None else None
        runs.append(r)
    best = best_run(table)
    curves = {}
    for trial_id, part in epochs.groupby("trial_id", sort=False):
        curves[str(trial_id)] = [[_plain(v) for v in part[c]] for c in CURVE_FIELDS]
    repeats = int(table.groupby(["run", *DIMENSIONS], dropna=False).size().max()) if len(table) else 0
    sentence, reduced = what_ran(exp) if len(exp.epochs) or exp.settings else ("", "")
    return {
        "title": last_name(exp.path),
        "path": without_query(shown_path(exp.path)),  # a bucket URI's credentials and query stay out of the page
        "ran": sentence,
        "reduced": reduced,
        "headline": _headline(exp, repeats),
        "counts": {str(k): int(v) for k, v in table["status"].value_counts().items()},
        "best": None if best is None else str(best["trial_id"]),
        "optimizers": _optimizers(table),
        "runs": runs,
        "curves": curves,
        "heatmap": _heatmap(table, ref),
        "effects": _effects(table),
        "importance": _importance(table),
        "repeats": repeats,
        "notes": list(exp.notes),
        "live": live,
        "poll_s": poll_s,
        "problem_statuses": list(PROBLEM_STATUSES),
        "stamp": time.time(),  # tells an open page that the data changed
        "updated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _plain(v):
    """A JSON-ready scalar: numpy and pandas values as Python ones, NaN and NA as null."""
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _headline(exp: Experiment, repeats: int) -> dict:
    st, data = exp.settings, exp.settings.get("data", {}) or {}
    grid = st.get("runs") and f"runs {', '.join(map(str, st['runs']))} of the study"
    if not grid and isinstance(st.get("grid"), dict):
        grid = "; ".join(f"{k} {', '.join(_level(k, v) for v in values)}" for k, values in st["grid"].items() if values)
    return {
        "grid": grid or "not recorded",
        "data": f"{data.get('source', 'a source not recorded')} ({data.get('train_images', '?')} train, "
        f"{data.get('test_images', '?')} test images; classes {', '.join(map(str, data.get('classes', [])))})"
        if data
        else "not recorded",
        "epochs": f"up to {st.get('epochs', '?')} a run, patience {st.get('patience', '?')}",
        "device": ", ".join(sorted(set(exp.epochs["device"].dropna()))) or "not recorded",
        "precision": ", ".join(sorted(set(exp.epochs["precision"].dropna()))) or "not recorded",
        "trials": f"{len(exp.table)} ({repeats} per configuration)",
    }


def _level(dim: str, v) -> str:
    if dim in ("dropout", "batchnorm"):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _optimizers(table: pd.DataFrame) -> list[dict]:
    """Each optimizer's best and mean here, next to the original study's over the same runs (a sweep of part of
    the grid is compared with that part, not with runs it did not make)."""
    ref = reference_table()
    part = scored(table)
    out = []
    for opt in optimizer_order(part["optimizer"].dropna()):
        ours = part[part["optimizer"] == opt]
        top = best_run(ours)
        theirs = ref[(ref["optimizer"] == opt) & ref["run"].isin(ours["run"].dropna())]
        orig = theirs.loc[theirs["final_accuracy"].idxmax()] if len(theirs) else None
        out.append(
            {
                "optimizer": opt,
                "runs": len(ours),
                "best": _plain(top["final_accuracy"]),
                "best_trial": str(top["trial_id"]),
                "best_run": _plain(top["run"]),
                "mean": _plain(ours["final_accuracy"].mean()),
                "orig_best": None if orig is None else _plain(orig["final_accuracy"]),
                "orig_best_run": None if orig is None else _plain(orig["run"]),
                "orig_mean": _plain(theirs["final_accuracy"].mean()) if len(theirs) else None,
            }
        )
    return out


def _heatmap(table: pd.DataFrame, ref: pd.Series) -> dict:
    """Mean (and, with repeats, standard deviation) per cell: optimizer x (dropout, batch norm) panel x lr x
    batch size, with the original's number for the same run."""
    part = scored(table).dropna(subset=list(DIMENSIONS))
    opts = optimizer_order(part["optimizer"])
    lrs = sorted(set(part["lr"]), reverse=True)
    bss = sorted(int(b) for b in set(part["batch_size"]))
    cells = []
    for keys, g in part.groupby(list(DIMENSIONS)):
        opt, lr, bs, drop, bn = keys
        acc = g["final_accuracy"]
        run = g["run"].dropna()
        cells.append(
            {
                "o": opts.index(opt),
                "p": (0 if drop else 2) + (1 if bn else 0),
                "lr": lrs.index(lr),
                "bs": bss.index(int(bs)),
                "mean": round(float(acc.mean()), 2),
                "std": _plain(round(float(acc.std()), 2)) if len(acc) > 1 else None,
                "n": len(acc),
                "orig": _plain(ref.get(int(run.iloc[0]))) if len(run) else None,
            }
        )
    return {"optimizers": opts, "lrs": lrs, "batch_sizes": bss, "cells": cells}


def _effects(table: pd.DataFrame) -> list[dict]:
    """Main effects: mean accuracy (± standard deviation) at each level of each hyperparameter, and the
    original's mean over the same runs."""
    part = scored(table).dropna(subset=list(DIMENSIONS))
    ref = reference_table()
    same = ref[ref["run"].isin(set(part["run"].dropna().astype(int)))]
    out = []
    for dim in DIMENSIONS:
        levels = optimizer_order(part[dim]) if dim == "optimizer" else sorted(set(part[dim]))
        rows = []
        for level in levels:
            acc = part.loc[part[dim] == level, "final_accuracy"]
            theirs = same.loc[same[dim] == level, "final_accuracy"]
            rows.append(
                {
                    "level": _level(dim, _plain(level)),
                    "mean": round(float(acc.mean()), 2),
                    "std": _plain(round(float(acc.std()), 2)) if len(acc) > 1 else None,
                    "n": len(acc),
                    "orig": _plain(round(float(theirs.mean()), 2)) if len(theirs) else None,
                }
            )
        out.append({"dim": dim, "levels": rows})
    return out


def variance_shares(df: pd.DataFrame, value: str = "final_accuracy") -> dict[str, float]:
    """Share of the variance of `value` that each grid dimension explains: its main effect's sum of squares over
    the total. On a complete grid the dimensions are orthogonal, so the shares are exact and add up, with the
    interactions and (with repeats) the seeds' noise, to one; no surrogate model is fitted."""
    y = df[value]
    total = float(((y - y.mean()) ** 2).sum())
    if len(df) < 2 or total == 0:
        return {}
    shares = {}
    for dim in DIMENSIONS:
        g = df.groupby(dim)[value]
        shares[dim] = float((g.size() * (g.mean() - y.mean()) ** 2).sum()) / total
    return shares


def _importance(table: pd.DataFrame) -> dict:
    part = scored(table).dropna(subset=list(DIMENSIONS))
    ref = reference_table()
    same = ref[ref["run"].isin(set(part["run"].dropna().astype(int)))]
    return {"ours": variance_shares(part), "orig": variance_shares(same), "orig_runs": len(same)}


# --- the page --------------------------------------------------------------------------------------------


def to_json(data: dict) -> str:
    """JSON that is safe inside a <script> element and as a JavaScript expression: no '<', '>' or '&' (no
    '</script>', no '<!--'), and no U+2028/U+2029 (line ends in older JavaScript)."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


def _asset(name: str) -> str:
    return resources.files("tune_alexnet").joinpath(name).read_text()


_PLOTLY: str | None = None


def _plotly_js() -> str:
    global _PLOTLY
    if _PLOTLY is None:
        _PLOTLY = _asset("plotly.min.js").replace("</script", "<\\/script")
    return _PLOTLY


def _sha256(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def render(data: dict) -> str:
    """The whole page as one string. The scripts run by hash only: markup that slipped into the page could not
    run even if it were parsed as such. 'strict-dynamic' trusts what those scripts add (the sidecar, re-read
    while the sweep runs) and nothing a parser meets; the parallel coordinates are plotly's precompiled
    ("strict") kind, so nothing needs eval."""
    scripts = [_plotly_js(), _asset("page.js")]
    csp = (
        "default-src 'none'; "
        f"script-src {' '.join(_sha256(s) for s in scripts)} 'strict-dynamic'; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
        "base-uri 'none'; form-action 'none'"
    )
    title = _escape(f"Study page: {data['title']}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_asset('page.css')}</style>\n</head>\n<body>\n"
        f"{_asset('page.html')}\n"
        f'<script type="application/json" id="study-data">{to_json(data)}</script>\n'
        f"<script>{scripts[0]}</script>\n<script>{scripts[1]}</script>\n</body></html>\n"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def sidecar(data: dict) -> str:
    return f"{UPDATE_FUNCTION}({to_json(data)});\n"


def page_files(exp: Experiment, live: dict | None = None, poll_s: float = POLL_S) -> dict[str, str]:
    """The page's two files by name, the sidecar first: what write_page writes (and a caller may size first)."""
    data = page_data(exp, live, poll_s)
    return {DATA_NAME: sidecar(data), PAGE_NAME: render(data)}


def write_page(exp: Experiment, out_dir: str | os.PathLike | None = None, live: dict | None = None,
               poll_s: float = POLL_S, files: dict[str, str] | None = None) -> str:  # fmt: skip
    """report.html and report-data.js in `out_dir` (default: the experiment folder, local or in a bucket), each
    written whole or not at all; returns report.html's path or URI. The sidecar goes first, so a page that
    polls never sees data older than its own. `files`: page_files(exp), when already made."""
    files = page_files(exp, live, poll_s) if files is None else files
    with output_dir(out_dir or exp.path, exp) as out:
        for name, text in files.items():
            out.put(name, text.encode("utf-8"))
    return next(p for p in out.written if without_query(p).endswith(PAGE_NAME)) if out.written else ""


def page_uri(exp_uri: str) -> str:
    """Where an experiment's page is, said the way the console says it."""
    from .storage import experiment_uri, is_remote

    return experiment_uri(exp_uri, PAGE_NAME) if is_remote(exp_uri) else os.path.join(exp_uri, PAGE_NAME)
