"""An experiment folder -> report.md and PNG figures, next to the original study's numbers.

Works from the exported table and per-epoch results alone (export.load_experiment),
so it reads finished, half-finished and failed experiments alike.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
from importlib import resources
from pathlib import Path

import pandas as pd

from .export import (
    DAMAGED,
    LOST,
    REPORT_NAME,
    Experiment,
    ExportError,
    best_run,
    check_out_dir,
    check_room,
    load_experiment,
    one_line,
    output_dir,
    shown_path,
)
from .grid import optimizer_order
from .settings import BATCH_SIZES, DIMENSIONS, EPOCHS, LRS, OPTIMIZERS, PATIENCE, TRIAL_DEFAULTS
from .storage import last_name, without_query

CHANCE_LEVEL = 11.0  # % accuracy at or below which a run learned nothing (10 classes)
ORIGINAL_LABEL = "original"
NOISE_SIGMAS = 2.0  # an original-vs-ours difference within this many seeds' std is noise
HEATMAP_ROWS = 12  # optimizers drawn in the heatmaps at most (a row each): the figure stays a readable size


def reference_table() -> pd.DataFrame:
    """The original study's 108 results, shipped with the package."""
    with resources.files("tune_alexnet").joinpath("reference/seed_results.csv").open() as f:
        ref = pd.read_csv(f)
    ref["dropout"] = ref["dropout"].astype(str).str.lower() == "true"
    ref["batchnorm"] = ref["batchnorm"].astype(str).str.lower() == "true"
    return ref


def scored(table: pd.DataFrame) -> pd.DataFrame:
    """Trials that produced an accuracy (finished, stopped, diverged after learning, or still running)."""
    return table[table["final_accuracy"].notna()]


def per_optimizer(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for opt in optimizer_order(table["optimizer"].dropna()):  # a damaged trial's may be unknown
        part = scored(table[table["optimizer"] == opt])
        if part.empty:
            continue
        best = best_run(part)
        rows.append(
            {
                "optimizer": opt,
                "runs": len(part),
                "mean": part["final_accuracy"].mean(),
                "median": part["final_accuracy"].median(),
                "best": part["final_accuracy"].max(),
                "worst": part["final_accuracy"].min(),
                "best_config": describe(best),
            }
        )
    return pd.DataFrame(rows, columns=["optimizer", "runs", "mean", "median", "best", "worst", "best_config"])


def describe(row) -> str:
    run = f"run {int(row['run'])}: " if pd.notna(row.get("run")) else ""
    return (
        f"{run}lr {row['lr']:g}, batch {int(row['batch_size'])}, "
        f"{'dropout' if row['dropout'] else 'no dropout'}, {'batch norm' if row['batchnorm'] else 'no batch norm'}"
    )


def effects(table: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy with and without batch norm and dropout, per optimizer."""
    part = scored(table)
    rows = []
    for opt in optimizer_order(part["optimizer"]):
        o = part[part["optimizer"] == opt]
        row = {"optimizer": opt}
        for switch in ("batchnorm", "dropout"):
            row[f"{switch} on"] = o.loc[o[switch], "final_accuracy"].mean()
            row[f"{switch} off"] = o.loc[~o[switch], "final_accuracy"].mean()
        rows.append(row)
    return pd.DataFrame(rows, columns=["optimizer", "batchnorm on", "batchnorm off", "dropout on", "dropout off"])


def per_config(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of final accuracy per configuration (over repeats)."""
    part = scored(table)
    grouped = part.groupby(["run", *DIMENSIONS], dropna=False)["final_accuracy"]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    return out.sort_values("run", na_position="last").reset_index(drop=True)


def comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Every run present in both this experiment and the original: both accuracies and the difference."""
    ours = per_config(table)
    ours = ours[ours["run"].notna()].astype({"run": int})
    ref = reference_table()[["run", "final_accuracy"]].rename(columns={"final_accuracy": ORIGINAL_LABEL})
    merged = ours.merge(ref, on="run").rename(columns={"mean": "ours"})
    merged["difference"] = merged["ours"] - merged[ORIGINAL_LABEL]
    merged["within_noise"] = [
        (abs(d) <= NOISE_SIGMAS * s) if (n >= 2 and pd.notna(s)) else None
        for d, s, n in zip(merged["difference"], merged["std"], merged["count"])
    ]
    return merged


def rank_correlation(comp: pd.DataFrame) -> float:
    if len(comp) < 3:
        return math.nan
    return comp["ours"].rank().corr(comp[ORIGINAL_LABEL].rank())  # Spearman's rho


def failed_runs(table: pd.DataFrame) -> pd.DataFrame:
    bad = table["status"].isin(["diverged", "errored"]) | (
        table["final_accuracy"].notna() & (table["final_accuracy"] <= CHANCE_LEVEL)
    )
    return table[bad]


def unreadable_runs(table: pd.DataFrame) -> pd.DataFrame:
    """Trials whose files are gone or not what a sweep writes: they count in no statistic, their error says why."""
    return table[table["status"].isin([DAMAGED, LOST])]


# --- figures -----------------------------------------------------------------


def _plt():
    """matplotlib, imported with its configuration and font cache in a folder of this user's alone: MPLCONFIGDIR,
    or XDG_CACHE_HOME's, may be shared, and it rewrites its font cache there through any link (another user's to
    a file of this user's) and reads one planted there (a traceback or a FIFO's hang)."""
    import sys

    if "matplotlib" not in sys.modules:
        from .cluster import from_the_root_folder

        os.environ["MPLCONFIGDIR"] = _private_matplotlib_folder()
        with from_the_root_folder():
            import matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _private_matplotlib_folder() -> str:
    """The private temp folder's (the local Ray's too), else one in this user's listed home (where no temporary
    folder can be written, a read-only /tmp: tempfile would have taken the working folder). Another user can force
    that second choice (by making the temp folder's name first), so it is said, and taken only where no other user
    could write, swap or have planted anything in it."""
    from .cluster import UnsafeTempDir, others_could_steer, private_temp_dir
    from .settings import listed_home, say
    from .storage import first_line, make_folders

    try:
        private = os.path.join(private_temp_dir(), "matplotlib")
    except (UnsafeTempDir, OSError) as exc:
        why = first_line(exc)
    else:  # this user's alone: what is odd in it was put there by one of this user's programs (a FIFO: a hang)
        try:
            if os.path.lexists(private) and (os.path.islink(private) or not os.path.isdir(private)):
                raise ExportError(  # (matplotlib would make a folder of its own in the temporary folder instead)
                    f"the figures cannot be drawn: {private}, matplotlib's folder, is not a folder; allowed: remove "
                    "it (it is made anew)"
                )
            odd = _not_made_by_this_user(Path(private), shared=False) if os.path.isdir(private) else None
            if odd and not odd.startswith("more than"):
                odd = f"{odd.split(', which')[0]}, which is not a file or folder of this user's"
            odd = odd and f"holds {odd}"
        except OSError as exc:
            odd = f"cannot be read ({first_line(exc)})"
        if odd:
            raise ExportError(
                f"the figures cannot be drawn: matplotlib's folder {private} {odd}; allowed: remove that folder (it "
                "is made anew)"
            )
        return private
    folder = listed_home() / ".cache" / "tune-alexnet" / "matplotlib"
    try:
        if not folder.is_absolute():  # (a uid with no entry in the password database: HOME as given)
            raise FileNotFoundError(2, "no home folder of this user's is known")
        if steer := others_could_steer(str(folder)):  # before anything is made there, and again once it is
            raise OSError(f"it{steer}")
        make_folders(folder)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # a link too: the chmod below follows it
            raise OSError("it is not a folder of this user's")
        os.chmod(folder, 0o700)
        if steer := others_could_steer(str(folder)):
            raise OSError(f"it{steer}")
        if planted := _not_made_by_this_user(folder):
            raise OSError(f"it holds {planted}")
        if not os.access(folder, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ExportError(
            f"the figures need a folder of matplotlib's own, and neither a temporary one ({why}) nor {folder} "
            f"({first_line(exc)}) can be had; allowed: TMPDIR set to a folder of yours"
        ) from None
    say(f"tune-alexnet: warning: matplotlib's settings are kept in {folder}, as no private temporary folder can "
        f"be had ({why})")  # fmt: skip
    return str(folder)


def _not_made_by_this_user(folder: Path, most: int = 10_000, shared: bool = True) -> str | None:
    """The first entry below `folder` that another user made or could write, or that is neither a plain file nor a
    folder: matplotlib rewrites its font cache there through a link, and its import reads every stylelib/*.mplstyle
    (a FIFO's hang). Walked without recursion (os.walk's ran past Python's stack on a deep tree), `most` entries.
    `shared=False`: a folder inside one only this user can enter, where a group's write bit (umask 002) is no
    opening. An entry that goes while it is walked (matplotlib's lock file) is passed over."""
    from .cluster import others_can_write

    pending, seen = [str(folder)], 0
    while pending:
        try:
            with os.scandir(pending.pop()) as found:
                entries = list(found)
        except FileNotFoundError:
            continue
        for entry in entries:
            seen += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind_ok = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            if st.st_uid != os.getuid() or not kind_ok or (shared and others_can_write(st)):
                return f"{os.path.relpath(entry.path, folder)!r}, which another user could have planted"
            if seen > most:
                return f"more than {most:,} entries, more than matplotlib makes"
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return None


def _default_style(draw):
    """Figures drawn on matplotlib's own defaults, alike wherever they are drawn: at its import matplotlib takes
    ./matplotlibrc, which whoever owns the working folder may have written (green figures, text of size 1)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with _plt().style.context("default"):
            return draw(*args, **kwargs)

    return drawn


@_default_style
def heatmaps(table: pd.DataFrame) -> bytes:
    plt = _plt()
    part = scored(table)
    opts = (optimizer_order(part["optimizer"]) or list(OPTIMIZERS))[:HEATMAP_ROWS]
    panels = [(d, b) for d in (True, False) for b in (False, True)]
    lrs = sorted(set(part["lr"]) | set(LRS), reverse=True)
    bss = sorted(set(part["batch_size"]) | set(BATCH_SIZES))
    fig, axes = plt.subplots(
        len(opts),
        len(panels),
        figsize=(3.0 * len(panels), 2.6 * len(opts) + 0.6),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    image = None
    for i, opt in enumerate(opts):
        for j, (drop, bn) in enumerate(panels):
            ax = axes[i][j]
            cell = part[(part["optimizer"] == opt) & (part["dropout"] == drop) & (part["batchnorm"] == bn)]
            grid = cell.groupby(["lr", "batch_size"])["final_accuracy"].mean().unstack().reindex(index=lrs, columns=bss)
            image = ax.imshow(grid.values, vmin=10, vmax=90, cmap="viridis", aspect="auto")
            for (r, c), v in pd.DataFrame(grid.values).stack().dropna().items():
                ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
            ax.set_xticks(range(len(bss)), [str(b) for b in bss])
            ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
            ax.set_title(f"{opt}: {'dropout' if drop else 'no dropout'}, {'BN' if bn else 'no BN'}", fontsize=9)
            if j == 0:
                ax.set_ylabel("learning rate")
            if i == len(opts) - 1:
                ax.set_xlabel("batch size")
    fig.colorbar(image, ax=axes, shrink=0.8, label="final accuracy (%)")
    shown = "" if len(opts) == part["optimizer"].nunique() or part.empty else f" (the first {len(opts)} optimizers)"
    fig.suptitle(f"Final accuracy (%) by learning rate and batch size; empty cells: not run{shown}")
    return _png(fig)


@_default_style
def effects_figure(eff: pd.DataFrame) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, switch in zip(axes, ("batchnorm", "dropout")):
        x = range(len(eff))
        for offset, state in ((-0.2, "off"), (0.2, "on")):
            bars = ax.bar([i + offset for i in x], eff[f"{switch} {state}"], width=0.4, label=state)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(x), eff["optimizer"])
        ax.set_xlim(-0.7, len(eff) - 0.3)
        ax.set_ylim(0, 100)
        ax.set_ylabel("mean final accuracy (%)")
        ax.set_title("batch norm" if switch == "batchnorm" else "dropout")
        ax.legend()
    return _png(fig)


@_default_style
def curves_figure(exp: Experiment) -> bytes:
    plt = _plt()
    table, epochs = exp.table, exp.epochs
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for opt in optimizer_order(scored(table)["optimizer"]):
        part = scored(table[table["optimizer"] == opt])
        best = best_run(part)
        e = epochs[epochs["trial_id"] == best["trial_id"]]
        ax.plot(e["epoch"], e["val_acc"], marker="o", ms=3, label=f"best {opt}: {describe(best)}")
    for _, row in table[table["status"] == "diverged"].iterrows():
        e = epochs[epochs["trial_id"] == row["trial_id"]]
        ax.plot(e["epoch"], e["val_acc"].fillna(0), ls="--", color="grey", alpha=0.7)
    if (table["status"] == "diverged").any():
        ax.plot([], [], ls="--", color="grey", label="diverged runs")
    ax.axhline(10, color="red", lw=0.8, ls=":", label="chance (10%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Validation accuracy per epoch")
    return _png(fig)


@_default_style
def comparison_figure(comp: pd.DataFrame) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for opt in optimizer_order(comp["optimizer"]):
        part = comp[comp["optimizer"] == opt]
        ax.errorbar(part[ORIGINAL_LABEL], part["ours"], yerr=part["std"].fillna(0), fmt="o", ms=4, label=opt)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("original study: final accuracy (%)")
    ax.set_ylabel("this experiment (%)")
    ax.set_title(f"Runs in both (n={len(comp)}), rank corr. {rank_correlation(comp):.2f}")
    if len(comp):
        ax.legend()
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    finally:
        _plt().close(fig)
    return buffer.getvalue()


# --- report.md -----------------------------------------------------------------


# Text from the experiment (an error line can hold anything) shown as text in a Markdown viewer: no HTML and no
# Markdown link of its own, and kept inside its cell.
MARKDOWN_ESCAPES = str.maketrans(
    {"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "[": "\\[", "]": "\\]"}
)


def as_text(value) -> str:
    """Text from the experiment as text in Markdown, on one line."""
    return " ".join(str(value).split()).translate(MARKDOWN_ESCAPES)


def code_span(text: str) -> str:
    """`text` as a Markdown code span, which shows all inside it as text: fenced by more backticks than it holds
    in a row (export.Output.tables_of reads the experiment's path back from one)."""
    text = one_line(text)  # a blank line would end the span and the paragraph
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence}{text}{fence}" if len(fence) == 1 else f"{fence} {text} {fence}"


def markdown_table(df: pd.DataFrame, floats: str = "{:.2f}") -> str:
    """Floats to 2 decimals (accuracies in %), learning rates as written (0.001); text kept inside its cell, as
    text."""

    def fmt(v, col):
        if isinstance(v, float):
            return "" if math.isnan(v) else (f"{v:g}" if col == "lr" else floats.format(v))
        return "" if v is None or v is pd.NA else as_text(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += [
        "| " + " | ".join(fmt(v, c) for v, c in zip(row, df.columns)) + " |" for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def write_report(source, out_dir: str | os.PathLike | None = None, files: dict[str, bytes] | None = None) -> str:
    """report.md and its figures in `out_dir` (default: the experiment folder, local or in a bucket), each written
    whole or not at all; returns report.md's path or URI. `files`: report_files(exp), when already made."""
    check_out_dir(out_dir)
    exp = source if isinstance(source, Experiment) else load_experiment(source)
    files = report_files(exp) if files is None else files
    with output_dir(out_dir or exp.path, exp) as out:
        for name, data in files.items():
            out.put(name, data)
    return next(p for p in out.written if without_query(p).endswith(REPORT_NAME))


def write_report_and_page(source, out_dir: str | os.PathLike | None = None) -> list[str]:
    """What `tune-alexnet report` writes: report.md, its figures and the study page (report.html and its data),
    made in memory first, so that a folder without room for all of them is refused before any is written or a
    folder made. Their paths or URIs."""
    from .page import page_files, write_page

    check_out_dir(out_dir)
    exp = source if isinstance(source, Experiment) else load_experiment(source)
    files, page = report_files(exp), page_files(exp)
    sizes = {name: len(content) for name, content in files.items()}
    sizes |= {name: len(text.encode()) for name, text in page.items()}
    check_room(out_dir or exp.path, sizes, f"{REPORT_NAME}, {len(files) - 1} figures and the study page")
    return [write_report(exp, out_dir, files), write_page(exp, out_dir, files=page)]


def what_ran(exp: Experiment) -> tuple[str, str]:
    """A sentence saying what ran, and what makes it smaller than the study ("" when nothing does)."""
    st, data = exp.settings, exp.settings.get("data", {})
    trial = {**TRIAL_DEFAULTS, **st.get("trial", {})}
    epochs, width = st.get("epochs", EPOCHS), float(trial["width"])
    precision = ", ".join(sorted(set(exp.epochs["precision"].dropna()))) or "not recorded"
    devices = ", ".join(sorted(set(exp.epochs["device"].dropna()))) or "not recorded"
    reduced = [
        text
        for cond, text in (
            (epochs < EPOCHS, f"at most {epochs} epochs a run instead of {EPOCHS}"),
            (st.get("subset") is not None, f"{st.get('subset')} training images a class"),
            (width != 1.0, f"AlexNet at width {width:g}"),
            (not trial["augment"], "no augmentation"),
        )
        if cond
    ]
    sentence = (
        f"What ran: up to {epochs} epochs a run (patience {st.get('patience', PATIENCE)}), "
        f"{as_text(data.get('train_images', '?'))} training and {as_text(data.get('test_images', '?'))} test images "
        f"from {as_text(data.get('source', 'a source not recorded'))}, AlexNet width {width:g}, "
        f"{as_text(st.get('repeats', 1))} trial(s) per configuration, precision {as_text(precision)}, on "
        f"{as_text(devices)}."
    )
    return sentence, "; ".join(reduced)


def _failure_sections(table: pd.DataFrame) -> list[str]:
    """The runs that failed, and (only where there are any) the trials that could not be read."""
    failed = failed_runs(table)
    parts = [
        f"## Diverged, errored or chance-level runs (at or below {CHANCE_LEVEL:g}%)",
        markdown_table(failed[["run", *DIMENSIONS, "seed", "status", "final_accuracy", "epochs_run", "error"]])
        if len(failed)
        else "None.",
    ]
    unreadable = unreadable_runs(table)
    if len(unreadable):
        parts += [
            "## Trials that could not be read",
            "Their result files are missing (lost) or not what a sweep writes (damaged): they count in no statistic "
            "above, and the error column names the file and field.",
            markdown_table(unreadable[["trial_id", "run", "optimizer", "status", "error"]]),
        ]
    return parts


def report_files(exp: Experiment) -> dict[str, bytes]:
    """report.md and its PNG figures, by name, made in memory."""
    table = exp.table
    opt_stats = per_optimizer(table)
    eff = effects(table)
    comp = comparison(table)
    repeats = int(table.groupby(["run", *DIMENSIONS], dropna=False).size().max()) if len(table) else 0

    figures = {
        "heatmaps.png": heatmaps(table),
        "effects.png": effects_figure(eff),
        "curves.png": curves_figure(exp),
        "comparison.png": comparison_figure(comp),
    }

    status_counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
    side = opt_stats[["optimizer", "runs", "mean", "best"]].copy()
    ref = reference_table()
    by_opt = ref.groupby("optimizer")["final_accuracy"]
    same_runs = ref[ref["run"].isin(set(comp["run"]))].groupby("optimizer")["final_accuracy"].mean()
    side["original mean"] = side["optimizer"].map(by_opt.mean())
    side["original best"] = side["optimizer"].map(by_opt.max())
    side["original mean, same runs"] = side["optimizer"].map(same_runs)

    ran, reduced = what_ran(exp)
    parts = [
        f"# Report: {as_text(last_name(exp.path))}",
        ran,
        f"Experiment {code_span(shown_path(exp.path))}: {len(table)} trials ({status_counts}); {repeats} trial(s) per configuration. "
        f"Accuracies are each run's best test accuracy in percent. Statistics use every trial with an accuracy "
        f"({len(scored(table))}); errored trials and trials that diverged before their first good epoch have none.",
        "## Per optimizer",
        markdown_table(opt_stats),
        "### Side by side with the original study",
        "The original's mean and best are over its 36 runs per optimizer; *same runs* is its mean over only the "
        "runs present here.",
        markdown_table(side),
        "## Final accuracy by learning rate and batch size",
        "![heatmaps](heatmaps.png)",
        "## Batch norm and dropout",
        "Mean final accuracy with each switch on and off, per optimizer.",
        markdown_table(eff),
        "![effects](effects.png)",
        "## Learning curves",
        "Validation accuracy per epoch of the best trial of each optimizer, and of diverged trials.",
        "![curves](curves.png)",
        *_failure_sections(table),
        "## Comparison with the original study",
    ]
    if len(comp) and reduced:
        parts.append(
            f"**This experiment is reduced ({reduced}), so its accuracies are not comparable with the "
            f"study's full runs: the differences below show how far a reduced run falls short, not "
            f"findings about the study.**"
        )
    if len(comp):
        rho = rank_correlation(comp)
        parts += [
            f"{len(comp)} runs are in both. Spearman rank correlation of their accuracies: "
            f"{'n/a (fewer than 3 runs)' if math.isnan(rho) else f'{rho:.3f}'}. Mean difference (ours - original): "
            f"{comp['difference'].mean():+.2f} points.",
            "![comparison](comparison.png)",
        ]
        cols = ["run", *DIMENSIONS, ORIGINAL_LABEL, "ours", "difference"]
        if repeats >= 2:
            cols += ["std", "count", "within_noise"]
            noisy = comp["within_noise"].dropna()
            parts.append(
                f"With {repeats} seeds per configuration, a difference counts as noise when it is within "
                f"{NOISE_SIGMAS:g} standard deviations of the seeds: {int(noisy.sum())} of {len(noisy)} are."
            )
        parts.append(markdown_table(comp[cols]))
    else:
        parts.append("No run of this experiment is on the original study's grid.")
    if repeats >= 2:
        parts += ["## Repeats: mean and standard deviation per configuration", markdown_table(per_config(table))]
    return {**figures, REPORT_NAME: ("\n\n".join(parts) + "\n").encode()}  # the figures before the text naming them
