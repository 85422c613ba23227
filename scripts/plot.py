"""Figures from run directories, each saved as PNG (300 dpi) and PDF (the command that made it in the metadata).

    python scripts/plot.py runs/multirun/table1 [--out DIR | --force] [--name table1_]

(a) acc_vs_sparsity: final test accuracy vs group sparsity, one curve per method over its sweep (mean ± std
    over seeds), the dense runs as a reference (black star and dashed line)
(b) acc_vs_flops: final test accuracy vs FLOPs reduction (log x), error bars over seeds on both axes
(c) sparsity_over_epochs: per epoch, group sparsity, nonzero groups / k and the lambda in effect (metrics.csv
    columns group_sparsity, nonzero_groups, k_groups, lam_eff); one panel column per target kept fraction,
    one line per method (mean over seeds, band: min-max over seeds)
(d) lambda_k: accuracy and the group sparsity the prox alone reached (prox_zeroed_groups) vs lambda at fixed
    k, one panel pair per (dataset, model, method) with a lambda sweep
(e) speedup_vs_flops: measured latency speedup vs FLOPs reduction, log-log with y = x; one panel per
    runtime (PyTorch CPU/GPU, ONNX Runtime CPU) and batch size
(f) widths/<run>: per-layer widths before / after compaction (compact.json), one per setting, in a subfolder
A method has one colour, each of its settings one marker; a lambda characterisation (scripts/_runs.py
`series`) is its own series, not joined into its method's k curve. Runs that did not reach their target
(collapsed or off target: `on_target`, docs/metrics.md) are hollow markers, never joined into a curve.
Sizes are paper widths (3.5 in single column, 7 in double) with every legend below the axes, inside the
image. By default the figures go to reports/figures/ (not tracked; existing files are kept unless --force);
the committed results/ is written only by the make targets, which pass --out. A figure whose data no run
has is skipped with a printed note. The functions return matplotlib Figures (no pyplot state), so the
notebook shows the same figures.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, MaxNLocator

from _runs import (DEFAULT_OUT, KEYS, PLACE_TOLERANCE, add_output_arguments, aggregate, load_metrics,
                   output_folder, parse_runs)

SPEEDUPS = {"speedup_cpu_b1": "PyTorch CPU, batch 1", "speedup_cpu_b64": "PyTorch CPU, batch 64",
            "speedup_ort_cpu_b1": "ONNX Runtime CPU, batch 1", "speedup_ort_cpu_b64": "ONNX Runtime CPU, batch 64",
            "speedup_cuda_b1": "PyTorch GPU, batch 1", "speedup_cuda_b64": "PyTorch GPU, batch 64"}
DENSE = ("dense", "none")  # the dense reference's method name (`none` in runs from before the rename)
DENSE_STYLE = {"color": "black", "marker": "*", "linestyle": "--"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1))]
SINGLE, DOUBLE, ROW, DPI = 3.5, 7.0, 2.2, 300  # inches: one / two paper columns, one row of panels; dots per inch
PAPER = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "figure.titlesize": 8, "legend.fontsize": 6.5,
         "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "lines.linewidth": 1.0, "lines.markersize": 4,
         "errorbar.capsize": 2}
MISSED = "hollow: did not reach its target"
NO_TARGET = -1.0  # the panel column of runs without a (placed) target


def paper():
    """matplotlib settings of the saved figures (figures() and save() use them)."""
    return matplotlib.rc_context(PAPER)


class Styles:
    """One colour per method (dense: black, with a star) and one marker / line style per setting of that
    method, fixed from the whole run set so that every figure of a set uses the same styles."""

    def __init__(self, records: pd.DataFrame):
        methods = sorted(m for m in records["method"].astype(str).unique() if m not in DENSE)
        self.colors = {m: f"C{i}" if len(methods) <= 10 else _tab20(i) for i, m in enumerate(methods)}
        self.colors.update({m: DENSE_STYLE["color"] for m in DENSE})
        self.index = {}
        for method, rows in records.groupby("method"):
            for i, setting in enumerate(sorted(rows["setting"].astype(str).unique())):
                self.index[method, setting] = i

    def __call__(self, method: str, setting: str = "") -> dict:
        if method in DENSE:
            return dict(DENSE_STYLE)
        i = self.index.get((method, str(setting)), 0)
        return {"color": self.colors.get(method, "gray"), "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[i % len(LINESTYLES)]}

    def line(self, method: str, setting: str = "") -> dict:
        style = self(method, setting)
        return {"color": style["color"], "linestyle": style["linestyle"]}


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _label(row) -> str:
    return " ".join(str(x) for x in (row["method"], row["setting"]) if x)


def _panels(n: int, title: str, rows: int | None = None, cols: int | None = None) -> tuple[Figure, list]:
    """n panels on a paper-width figure: one column wide for one panel, two for more (at most 3 a row)."""
    cols = cols or (2 if n in (2, 4) else min(n, 3))
    rows = rows or -(-n // cols)
    fig = Figure(figsize=(SINGLE if cols == 1 else DOUBLE, ROW * rows + 0.3), layout="constrained")
    fig.suptitle(title)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _legend_below(fig: Figure, extra: list[tuple] = ()) -> None:
    """One legend for the whole figure, below the axes and inside the image (the figure grows to hold it):
    the entries of every axes, each label once, then `extra` (handle, label) pairs."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    entries.update({label: handle for handle, label in extra})
    if not entries:
        return
    width, height = fig.get_size_inches()
    ncols = max(1, int(width // 1.7))
    fig.set_size_inches(width, height + 0.16 * -(-len(entries) // ncols) + 0.1)
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=ncols, frameon=False)


def _missed_entry() -> tuple:
    return Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none"), MISSED


class PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks get a label, written as plain numbers (0.5, 2, 100)."""

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log(ax, which: str) -> None:
    """Log-scale ax's `which` ("x" or "y") axis, labelled in plain numbers (0.5, 2, 100 rather than 5×10⁻¹);
    intermediate ticks get labels only when the axis spans less than a decade, as matplotlib's default."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _dense_reference(ax, rows: pd.DataFrame, x: float) -> None:
    """The dense runs' accuracy (mean over seeds): a black star at `x` (its sparsity / FLOPs reduction) and
    a dashed horizontal line."""
    dense = rows[rows["method"].isin(DENSE) & rows["final_test_acc_mean"].notna()]
    if not dense.empty:
        y = 100 * dense["final_test_acc_mean"].max()
        ax.axhline(y, color=DENSE_STYLE["color"], ls=DENSE_STYLE["linestyle"], lw=0.8)
        ax.plot([x], [y], color=DENSE_STYLE["color"], marker=DENSE_STYLE["marker"], markersize=7, ls="none",
                label="dense")


def _accuracy_figure(table: pd.DataFrame, x: str, title: str, xlabel: str, draw, dense_x: float,
                     log_x: bool = False) -> Figure | None:
    """Final accuracy against the aggregated metric `x`: one panel per (dataset, model), `draw(ax, series,
    rows sorted by x)` for every non-dense series, the dense method as a reference."""
    table = table[table["final_test_acc_mean"].notna()]
    points = table[table[f"{x}_mean"].notna() & ~table["method"].isin(DENSE)]
    if points.empty:
        return None
    pairs = sorted(points.groupby(["dataset", "model"]).groups)
    fig, axes = _panels(len(pairs), title)
    for ax, (dataset, model) in zip(axes, pairs):
        here = (table["dataset"] == dataset) & (table["model"] == model)
        for series, rows in points[here[points.index]].groupby("series"):
            draw(ax, series, rows.sort_values(f"{x}_mean"))
        _dense_reference(ax, table[here], dense_x)
        if log_x:
            _log(ax, "x")
        ax.set(title=f"{dataset} / {model}", xlabel=xlabel, ylabel="final test accuracy (%)")
        ax.grid(alpha=0.3, which="both" if log_x else "major")
    _legend_below(fig, [_missed_entry()] if (~points["on_target"].astype(bool)).any() else [])
    return fig


def _points(ax, x, y, xerr, yerr, style: dict, on_target: bool, label=None) -> None:
    """One table row: filled marker with error bars, hollow when it did not reach its target."""
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=style["color"], marker=style["marker"], ls="none",
                markerfacecolor=style["color"] if on_target else "none", label=label)


def _series_curve(ax, rows: pd.DataFrame, x: str, scale_x: float, styles: Styles, xerr: bool) -> None:
    """A series' rows: the on-target ones joined into its curve (a lambda characterisation: markers only),
    each row's marker in its setting's style, hollow where it missed its target."""
    series, method = rows["series"].iloc[0], rows["method"].iloc[0]
    on = rows[rows["on_target"].astype(bool)]
    if series == method and len(on):
        ax.plot(scale_x * on[f"{x}_mean"], 100 * on["final_test_acc_mean"], color=styles(method)["color"],
                label=series)
    for i, (_, row) in enumerate(rows.iterrows()):
        style = styles(method, row["setting"])
        if series != method:  # its own series: one marker of its own
            style = {**style, "marker": "x" if row["on_target"] else "o"}
        # the legend entry: the curve's, else (a lambda sweep, a method with no row on target) the first marker's
        label = series if i == 0 and (series != method or not len(on)) else None
        _points(ax, scale_x * row[f"{x}_mean"], 100 * row["final_test_acc_mean"],
                scale_x * np.nan_to_num(row[f"{x}_std"]) if xerr else None,
                100 * np.nan_to_num(row["final_test_acc_std"]), style, bool(row["on_target"]), label)


def acc_vs_sparsity(table: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(a) from `aggregate`'s table: one panel per (dataset, model), one curve per series (a marker per
    setting; the on-target rows joined), the dense method as a reference."""
    styles = styles or Styles(table)
    return _accuracy_figure(table, "group_sparsity", "Accuracy vs group sparsity (mean ± std over seeds)",
                            "group sparsity (% groups zero)",
                            lambda ax, series, rows: _series_curve(ax, rows, "group_sparsity", 100, styles, False),
                            dense_x=0.0)


def acc_vs_flops(table: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(b) from `aggregate`'s table: accuracy vs FLOPs reduction (log x), mean ± std over seeds on both axes,
    one colour per method, one marker per setting, dense as a reference."""
    styles = styles or Styles(table)
    return _accuracy_figure(table, "flops_reduction", "Accuracy vs FLOPs reduction (mean ± std over seeds)",
                            "FLOPs reduction (dense / compact, log scale)",
                            lambda ax, series, rows: _series_curve(ax, rows, "flops_reduction", 1, styles, True),
                            dense_x=1.0, log_x=True)


def _curves(records: pd.DataFrame, column: str) -> list[tuple[pd.Series, pd.DataFrame]]:
    """(record, metrics.csv) of every run whose metrics.csv has `column`."""
    return [(row, m) for _, row in records.iterrows()
            if (m := load_metrics(row["run"])) is not None and column in m]


def placed_targets(records: pd.DataFrame) -> pd.Series:
    """Each record's target kept fraction for figures by target: its own (k, GBLR's target width), else
    (lambda-only methods) the target of the other runs nearest its setting's mean kept fraction, within
    PLACE_TOLERANCE; NaN when none is near."""
    targets = sorted(records["target_kept"].dropna().unique())
    kept = records.groupby([*KEYS])["kept"].transform("mean")

    def place(i):
        own = records.at[i, "target_kept"]
        if not np.isnan(own) or not targets or np.isnan(kept[i]):
            return own
        near = min(targets, key=lambda t: abs(t - kept[i]))
        return near if abs(near - kept[i]) <= PLACE_TOLERANCE else np.nan
    return pd.Series([place(i) for i in records.index], index=records.index, dtype=float)


def _band(ax, frames: list[pd.DataFrame], value, style: dict, label) -> None:
    """Mean over runs per epoch as a line, min-max over runs as a band."""
    per_epoch = pd.concat([pd.DataFrame({"epoch": m["epoch"], "v": value(m)}) for m in frames]).groupby("epoch")["v"]
    mean, low, high = per_epoch.mean(), per_epoch.min(), per_epoch.max()
    ax.plot(mean.index, mean.values, label=label, **style)
    if len(frames) > 1:
        ax.fill_between(mean.index, low.values, high.values, color=style["color"], alpha=0.2, lw=0)


def sparsity_over_epochs(records: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(c) per epoch, over the completed runs: group sparsity; nonzero groups / k (1 = exactly k groups left);
    lambda in effect (log); rows of panels for the metrics some run logged, one column per target kept
    fraction (`placed_targets`). One line per method (per setting where a method has several at a target):
    the mean over seeds, the band min-max over seeds. Lambda characterisations (lambda_k draws them) are left
    out (as dense runs are), and runs that missed their target are thin dotted lines of their own."""
    styles = styles or Styles(records)
    done = records[(records["status"] == "completed") & (records["series"] == records["method"])
                   & ~records["method"].isin(DENSE)]
    done = done.assign(placed=placed_targets(done).fillna(NO_TARGET))
    curves = _curves(done, "group_sparsity")
    if not curves:
        return None
    k_col = lambda m: "k_groups" if "k_groups" in m else "k"  # noqa: E731  (older runs: "k")
    metrics = [("group sparsity (% groups zero)", lambda m: 100 * m["group_sparsity"], lambda m: True),
               ("nonzero groups / k", lambda m: m["nonzero_groups"] / m[k_col(m)],
                lambda m: "nonzero_groups" in m and k_col(m) in m),
               ("lambda in effect", lambda m: m["lam_eff"].where(m["lam_eff"] > 0), lambda m: "lam_eff" in m)]
    metrics = [spec for spec in metrics if any(spec[2](m) for _, m in curves)]
    columns = sorted({r["placed"] for r, _ in curves}, key=lambda t: (t == NO_TARGET, t))
    fig, axes = _panels(len(metrics) * len(columns), "Sparsity during training (line: mean over seeds, band: "
                        "min-max)", rows=len(metrics), cols=len(columns))
    missed = False
    for c, target in enumerate(columns):
        groups = {}
        for r, m in curves:
            if r["placed"] == target:
                groups.setdefault((r["method"], r["setting"], bool(r["on_target"])), []).append((r, m))
        per_method = pd.Series([method for method, _, on in groups if on]).value_counts()
        for row_i, (ylabel, value, has) in enumerate(metrics):
            ax = axes[row_i * len(columns) + c]
            for (method, setting, on), runs in sorted(groups.items()):
                frames = [m for _, m in runs if has(m)]
                if not frames:
                    continue
                several = per_method.get(method, 0) > 1
                style = styles.line(method, setting if several else "")
                if on:
                    label = f"{method} {setting}".strip() if several else method
                    _band(ax, frames, value, style, label)
                else:  # each run that missed its target on its own
                    missed = True
                    for m in frames:
                        ax.plot(m["epoch"], value(m), color=style["color"], ls=":", lw=0.7)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by these runs", transform=ax.transAxes, ha="center", color="gray")
                ax.set(xticks=[], yticks=[])
            elif ylabel.startswith("nonzero"):
                ax.axhline(1.0, color="gray", lw=0.6)
                _log(ax, "y")
            elif ylabel.startswith("lambda"):
                ax.set_yscale("log")
            ax.set(ylabel=ylabel if c == 0 else None, xlabel="epoch" if row_i == len(metrics) - 1 else None)
            if row_i == 0:
                ax.set_title("no target" if target == NO_TARGET else f"target kept fraction {target:g}")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    extra = [(Line2D([], [], color="gray", ls=":", lw=0.7), "dotted: a run that missed its target")] if missed else []
    _legend_below(fig, extra)
    return fig


def _n_groups(m: pd.DataFrame) -> float:
    """Number of groups of a run, from a metrics row with group sparsity < 1: nonzero / (1 - sparsity)."""
    rows = m[m["group_sparsity"] < 1]
    if rows.empty:
        return np.nan
    return float(np.round(rows["nonzero_groups"].iloc[0] / (1 - rows["group_sparsity"].iloc[0])))


def lambda_k(records: pd.DataFrame) -> Figure | None:
    """(d) the lambda-k characterisation: for each (dataset, model, method) swept over lambda at some fixed
    k, final test accuracy and the group sparsity the prox reached by itself (prox_zeroed_groups / groups,
    the sparsity before any hard finish) vs lambda, mean ± std over seeds; dotted: the sparsity k asks for.
    A lambda at which a run collapsed is a hollow marker, left out of the accuracy curve."""
    done = records[records["status"] == "completed"]
    rows = []
    for row, m in _curves(done, "prox_zeroed_groups"):
        lam, k = row["config"].get("regularizer.lam"), row["config"].get("regularizer.k")
        n = _n_groups(m) if {"nonzero_groups", "group_sparsity"} <= set(m) else np.nan
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            continue
        if lam > 0 and k is not None and n > 0:
            target = 1 - m["k_groups"].iloc[-1] / n if "k_groups" in m else np.nan
            rows.append({**{c: row[c] for c in ("dataset", "model", "method")}, "lam": lam, "k": str(k),
                         "acc": 100 * row["final_test_acc"], "prox": 100 * m["prox_zeroed_groups"].max() / n,
                         "target": 100 * target, "collapsed": bool(row["collapsed"])})
    data = pd.DataFrame(rows)
    if data.empty:
        return None
    swept = data.groupby(["dataset", "model", "method", "k"])["lam"].nunique()
    keys = sorted({key[:3] for key, n in swept.items() if n > 1})
    if not keys:
        return None
    fig, axes = _panels(2 * len(keys), "Accuracy and prox-made sparsity vs lambda at fixed k", rows=len(keys), cols=2)
    for (dataset, model, method), (acc_ax, sp_ax) in zip(keys, zip(axes[::2], axes[1::2])):
        here = data[(data["dataset"] == dataset) & (data["model"] == model) & (data["method"] == method)]
        for i, (k, rows_k) in enumerate(here.groupby("k")):
            stats = rows_k.groupby("lam")[["acc", "prox", "target"]].agg(["mean", "std"]).sort_index()
            collapsed = rows_k.groupby("lam")["collapsed"].any().sort_index()
            style = {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}
            drawn = {"acc": ~collapsed, "prox": collapsed.index == collapsed.index}  # prox: every lambda
            for ax, column in ((acc_ax, "acc"), (sp_ax, "prox")):
                ok = drawn[column]
                ax.errorbar(stats.index[ok], stats[column, "mean"][ok], yerr=stats[column, "std"][ok].fillna(0),
                            label=f"k={k}", **style)
            if collapsed.any():
                _points(acc_ax, stats.index[collapsed], stats["acc", "mean"][collapsed],
                        None, stats["acc", "std"][collapsed].fillna(0), style, False)
            if stats["target", "mean"].notna().any():
                sp_ax.axhline(stats["target", "mean"].mean(), color=style["color"], ls=":", lw=1)
        acc_ax.set(title=f"{dataset} / {model} / {method}", xlabel="lambda", ylabel="final test accuracy (%)")
        sp_ax.set(title="zeroed by the prox alone (dotted: 1 - k)", xlabel="lambda", ylabel="groups zero (%)",
                  ylim=(-2, 102))
        for ax in (acc_ax, sp_ax):
            _log(ax, "x")
            ax.grid(alpha=0.3, which="both")
    _legend_below(fig, [_missed_entry()] if data["collapsed"].any() else [])
    return fig


def speedup_vs_flops(records: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(e) one panel per runtime and batch size, one point per completed run, log-log with y = x."""
    styles = styles or Styles(records)
    done = records[(records["status"] == "completed") & records["flops_reduction"].notna()]
    measured = [c for c in SPEEDUPS if c in done and done[c].notna().any()]
    if not measured:
        return None
    fig, axes = _panels(len(measured), "Measured speedup vs FLOPs reduction (compacted vs dense model)")
    for ax, col in zip(axes, measured):
        here = done[done[col].notna()]
        for (method, setting), rows in here.groupby(["method", "setting"]):
            style = styles(method, setting)
            for on, part in rows.groupby(rows["on_target"].astype(bool)):  # hollow: missed its target
                ax.scatter(part["flops_reduction"], part[col], marker=style["marker"], s=14,
                           facecolors=style["color"] if on else "none", edgecolors=style["color"],
                           label=f"{method} {setting}".strip())
        values = pd.concat([here["flops_reduction"], here[col]])
        low, high = values.min() / 1.2, values.max() * 1.2
        ax.plot([low, high], [low, high], color="gray", ls="--", label="y = x")
        _log(ax, "x")
        _log(ax, "y")
        ax.set(title=SPEEDUPS[col], xlabel="FLOPs reduction (dense / compact)",
               ylabel="latency speedup (dense / compact)")
        ax.grid(alpha=0.3, which="both")
    _legend_below(fig, [_missed_entry()] if (~done["on_target"].astype(bool)).any() else [])
    return fig


def layer_widths(run_dir, title: str = "") -> Figure | None:
    """(f) bar chart of compact.json's {layer: [width_before, width_after]}."""
    path = Path(run_dir) / "compact.json"
    if not path.exists():
        return None
    widths = json.loads(path.read_text())
    names = list(widths)
    before, after = [widths[n][0] for n in names], [widths[n][1] for n in names]
    fig = Figure(figsize=(min(DOUBLE, max(SINGLE, 0.25 * len(names) + 1)), ROW + 0.6), layout="constrained")
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], before, width=0.4, color="lightgray", label="before")
    ax.bar([i + 0.2 for i in x], after, width=0.4, color="C0", label="after (kept)")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize="small")
    ax.set(title=f"Per-layer width before / after compaction\n{title}", xlabel="layer",
           ylabel="width (channels / units)")
    _legend_below(fig)
    return fig


def save(fig: Figure, out: Path, name: str, command: str = "") -> list[Path]:
    """`out/name`.png (300 dpi) and .pdf; `name` may hold a subfolder (widths/...). The PDF carries no
    creation date, so redrawing unchanged data rewrites the same bytes (no churn in committed figures)."""
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with paper():
        fig.savefig(paths[0], dpi=DPI, bbox_inches="tight", pad_inches=0.02, metadata={"Description": command})
        fig.savefig(paths[1], bbox_inches="tight", pad_inches=0.02, metadata={"Subject": command, "CreationDate": None})
    return paths


def figures(records: pd.DataFrame, style=paper) -> dict[str, Figure | None]:
    """Every figure by file name (None when its data is absent); (f) for the first run of each setting
    that has compact.json, under widths/. An empty dict when no run completed. Drawn in `style` (the
    paper settings; nullcontext for matplotlib's own)."""
    done = records[records["status"] == "completed"]
    if done.empty:
        return {}
    with style():
        styles, table = Styles(records), aggregate(records)
        out = {"acc_vs_sparsity": acc_vs_sparsity(table, styles), "acc_vs_flops": acc_vs_flops(table, styles),
               "sparsity_over_epochs": sparsity_over_epochs(records, styles), "lambda_k": lambda_k(records),
               "speedup_vs_flops": speedup_vs_flops(records, styles)}
        compacted = done[[(Path(r) / "compact.json").exists() for r in done["run"]]]
        for _, row in compacted.groupby(KEYS).head(1).iterrows():
            title = f"{row['dataset']} / {row['model']} / {_label(row)} (seed {row['seed']})"
            slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", f"{row['dataset']}_{row['model']}_{_label(row)}").strip("_")
            out[f"widths/{slug}"] = layer_widths(row["run"], title)
    if compacted.empty:
        out["widths"] = None
    return out


def file_name(name: str, prefix: str) -> str:
    """The prefix goes on the file name, inside a subfolder (widths/<prefix><run>)."""
    folder, _, stem = name.rpartition("/")
    return f"{folder}/{prefix}{stem}" if folder else prefix + stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = DEFAULT_OUT / "figures"
    add_output_arguments(parser, default)
    parser.add_argument("--name", default="", help="prefix of the file names")
    args, records, command = parse_runs(parser, "scripts/plot.py", argv)
    drawn = figures(records)
    if not drawn:
        counts = records["status"].value_counts().to_dict()
        print(f"no completed run among {len(records)} ({', '.join(f'{n} {s}' for s, n in counts.items())}): "
              "no figure drawn")
    names = {name: file_name(name, args.name) for name, fig in drawn.items() if fig is not None}
    out = output_folder(parser, args, default, [f"{n}.{ext}" for n in names.values() for ext in ("png", "pdf")])
    for name, fig in drawn.items():
        if fig is None:
            print(f"skipped {name}: no run has the data it needs")
            continue
        for path in save(fig, out, names[name], command):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
