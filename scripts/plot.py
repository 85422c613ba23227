"""Figures from run directories, each saved as PNG and PDF (the command that made it in the metadata).

    python scripts/plot.py runs/multirun/table1 --out results/figures [--name table1_]

(a) acc_vs_sparsity: final test accuracy vs group sparsity, one curve per method over its sweep, the dense
    runs as a reference line
(b) acc_vs_flops: final test accuracy vs FLOPs reduction (log x), error bars over seeds on both axes
(c) sparsity_over_epochs: per epoch, group sparsity, nonzero groups / k and the lambda in effect
    (metrics.csv columns group_sparsity, nonzero_groups, k_groups, lam_eff)
(d) lambda_k: accuracy and the group sparsity the prox alone reached (prox_zeroed_groups) vs lambda at fixed
    k, one panel pair per (dataset, model, method) with a lambda sweep
(e) speedup_vs_flops: measured latency speedup vs FLOPs reduction, log-log with y = x; one panel per
    runtime (PyTorch CPU/GPU, ONNX Runtime CPU) and batch size
(f) widths_<run>: per-layer widths before / after compaction (compact.json), one per setting
Every figure gives a method one colour and each of its settings one marker and line style. A figure whose
data no run has is skipped with a printed note (older runs lack the newer metrics columns). The functions
return matplotlib Figures (no pyplot state), so the notebook shows the same figures.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from _runs import KEYS, aggregate, load_metrics, parse_runs

SPEEDUPS = {"speedup_cpu_b1": "PyTorch CPU, batch 1", "speedup_cpu_b64": "PyTorch CPU, batch 64",
            "speedup_ort_cpu_b1": "ONNX Runtime CPU, batch 1", "speedup_ort_cpu_b64": "ONNX Runtime CPU, batch 64",
            "speedup_cuda_b1": "PyTorch GPU, batch 1", "speedup_cuda_b64": "PyTorch GPU, batch 64"}
DENSE = ("dense", "none")  # the dense reference's method name (`none` in runs from before the rename)
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1))]


class Styles:
    """One colour per method and one marker / line style per setting of that method, fixed from the whole
    run set so that every figure of a set uses the same styles."""

    def __init__(self, records: pd.DataFrame):
        methods = sorted(records["method"].astype(str).unique())
        self.colors = {m: f"C{i}" if len(methods) <= 10 else _tab20(i) for i, m in enumerate(methods)}
        self.index = {}
        for method, rows in records.groupby("method"):
            for i, setting in enumerate(sorted(rows["setting"].astype(str).unique())):
                self.index[method, setting] = i

    def __call__(self, method: str, setting: str = "") -> dict:
        i = self.index.get((method, str(setting)), 0)
        return {"color": self.colors.get(method, "k"), "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[i % len(LINESTYLES)]}

    def line(self, method: str, setting: str = "") -> dict:
        style = self(method, setting)
        return {"color": style["color"], "linestyle": style["linestyle"]}


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _label(row) -> str:
    return " ".join(str(x) for x in (row["method"], row["setting"]) if x)


def _panels(n: int, title: str, width: float = 5.0, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * n, 4.0 * rows), layout="constrained")
    fig.suptitle(title)
    return fig, list(fig.subplots(rows, n, squeeze=False).flat)


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


def _dense_line(ax, rows: pd.DataFrame) -> None:
    """The dense runs' accuracy (mean over seeds) as a horizontal reference line."""
    dense = rows[rows["method"].isin(DENSE) & rows["final_test_acc_mean"].notna()]
    if not dense.empty:
        ax.axhline(100 * dense["final_test_acc_mean"].max(), color="gray", ls="--", label="dense")


def _accuracy_figure(table: pd.DataFrame, x: str, title: str, xlabel: str, draw, log_x: bool = False) -> Figure | None:
    """Final accuracy against the aggregated metric `x`: one panel per (dataset, model), `draw(ax, method,
    rows sorted by x)` for every non-dense method, the dense method as a reference line."""
    table = table[table["final_test_acc_mean"].notna()]
    points = table[table[f"{x}_mean"].notna() & ~table["method"].isin(DENSE)]
    if points.empty:
        return None
    pairs = sorted(points.groupby(["dataset", "model"]).groups)
    fig, axes = _panels(len(pairs), title)
    for ax, (dataset, model) in zip(axes, pairs):
        here = (table["dataset"] == dataset) & (table["model"] == model)
        for method, rows in points[here[points.index]].groupby("method"):
            draw(ax, method, rows.sort_values(f"{x}_mean"))
        _dense_line(ax, table[here])
        if log_x:
            _log(ax, "x")
        ax.set(title=f"{dataset} / {model}", xlabel=xlabel, ylabel="final test accuracy (%), mean ± std")
        ax.grid(alpha=0.3, which="both" if log_x else "major")
        ax.legend(fontsize="small")
    return fig


def acc_vs_sparsity(table: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(a) from `aggregate`'s table: one panel per (dataset, model), one curve per method (a marker per
    setting), the dense method as a reference line."""
    styles = styles or Styles(table)

    def draw(ax, method, rows):
        ax.errorbar(100 * rows["group_sparsity_mean"], 100 * rows["final_test_acc_mean"],
                    yerr=100 * rows["final_test_acc_std"].fillna(0), color=styles(method)["color"], capsize=3,
                    label=method)
        for _, row in rows.iterrows():
            ax.plot(100 * row["group_sparsity_mean"], 100 * row["final_test_acc_mean"],
                    **{**styles(method, row["setting"]), "linestyle": "none"})
    return _accuracy_figure(table, "group_sparsity", "Accuracy vs group sparsity over a sweep",
                            "group sparsity (% groups zero)", draw)


def acc_vs_flops(table: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(b) from `aggregate`'s table: accuracy vs FLOPs reduction (log x), mean ± std over seeds on both axes,
    one colour per method, one marker per setting, dense as a reference line."""
    styles = styles or Styles(table)

    def draw(ax, method, rows):
        ax.plot(rows["flops_reduction_mean"], 100 * rows["final_test_acc_mean"], color=styles(method)["color"],
                alpha=0.5, label=method)
        for _, row in rows.iterrows():
            style = styles(method, row["setting"])
            ax.errorbar(row["flops_reduction_mean"], 100 * row["final_test_acc_mean"],
                        xerr=np.nan_to_num(row["flops_reduction_std"]),
                        yerr=100 * np.nan_to_num(row["final_test_acc_std"]),
                        color=style["color"], marker=style["marker"], capsize=3, ls="none")
    return _accuracy_figure(table, "flops_reduction", "Accuracy vs FLOPs reduction (error bars: std over seeds)",
                            "FLOPs reduction (dense / compact, log scale)", draw, log_x=True)


def _curves(records: pd.DataFrame, column: str) -> list[tuple[pd.Series, pd.DataFrame]]:
    """(record, metrics.csv) of every run whose metrics.csv has `column`."""
    return [(row, m) for _, row in records.iterrows()
            if (m := load_metrics(row["run"])) is not None and column in m]


def sparsity_over_epochs(records: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(c) per epoch and run: group sparsity; nonzero groups / k (1 = exactly k groups left); lambda in
    effect (log). The last two panels only when some run logged their columns."""
    styles = styles or Styles(records)
    curves = _curves(records, "group_sparsity")
    if not curves:
        return None
    k_col = lambda m: "k_groups" if "k_groups" in m else "k"  # noqa: E731  (older runs: "k")
    has_k = [(r, m) for r, m in curves if "nonzero_groups" in m and k_col(m) in m]
    has_lam = [(r, m) for r, m in curves if "lam_eff" in m]
    fig, axes = _panels(1 + bool(has_k) + bool(has_lam), "Sparsity during training (colour: method, line style: "
                        "setting)", width=4.5)
    left, rest = axes[0], iter(axes[1:])
    labelled = set()
    for row, m in curves:  # seeds of one setting share its style and its legend entry
        label = _label(row)
        left.plot(m["epoch"], 100 * m["group_sparsity"], label=None if label in labelled else label,
                  **styles.line(row["method"], row["setting"]))
        labelled.add(label)
    left.set(title="group sparsity", xlabel="epoch", ylabel="groups zero (%)")
    if has_k:
        ax = next(rest)
        for row, m in has_k:
            ax.plot(m["epoch"], m["nonzero_groups"] / m[k_col(m)], **styles.line(row["method"], row["setting"]))
        ax.axhline(1.0, color="gray", lw=0.8)
        _log(ax, "y")
        ax.set(title="nonzero groups / k (1: exactly k)", xlabel="epoch", ylabel="nonzero groups / k")
    if has_lam:
        ax = next(rest)
        for row, m in has_lam:
            lam = m["lam_eff"].where(m["lam_eff"] > 0)  # 0 once the prox is off: not drawn on a log axis
            ax.plot(m["epoch"], lam, **styles.line(row["method"], row["setting"]))
        ax.set_yscale("log")
        ax.set(title="lambda in effect", xlabel="epoch", ylabel="lambda")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*left.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
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
    the sparsity before any hard finish) vs lambda, mean ± std over seeds; dotted: the sparsity k asks for."""
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
                         "target": 100 * target})
    data = pd.DataFrame(rows)
    if data.empty:
        return None
    swept = data.groupby(["dataset", "model", "method", "k"])["lam"].nunique()
    keys = sorted({key[:3] for key, n in swept.items() if n > 1})
    if not keys:
        return None
    fig, axes = _panels(2, "Accuracy and prox-made sparsity vs lambda at fixed k", width=5.0, rows=len(keys))
    for (dataset, model, method), (acc_ax, sp_ax) in zip(keys, zip(axes[::2], axes[1::2])):
        here = data[(data["dataset"] == dataset) & (data["model"] == model) & (data["method"] == method)]
        for i, (k, rows_k) in enumerate(here.groupby("k")):
            stats = rows_k.groupby("lam")[["acc", "prox", "target"]].agg(["mean", "std"]).sort_index()
            style = {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "capsize": 3}
            for ax, column in ((acc_ax, "acc"), (sp_ax, "prox")):
                ax.errorbar(stats.index, stats[column, "mean"], yerr=stats[column, "std"].fillna(0), label=f"k={k}",
                            **style)
            if stats["target", "mean"].notna().any():
                sp_ax.axhline(stats["target", "mean"].mean(), color=style["color"], ls=":", lw=1)
        acc_ax.set(title=f"{dataset} / {model} / {method}", xlabel="lambda", ylabel="final test accuracy (%)")
        sp_ax.set(title="zeroed by the prox alone (dotted: 1 - k)", xlabel="lambda", ylabel="groups zero (%)",
                  ylim=(-2, 102))
        for ax in (acc_ax, sp_ax):
            _log(ax, "x")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
    return fig


def speedup_vs_flops(records: pd.DataFrame, styles: Styles | None = None) -> Figure | None:
    """(e) one panel per runtime and batch size, one point per completed run, log-log with y = x."""
    styles = styles or Styles(records)
    done = records[(records["status"] == "completed") & records["flops_reduction"].notna()]
    measured = [c for c in SPEEDUPS if c in done and done[c].notna().any()]
    if not measured:
        return None
    fig, axes = _panels(len(measured), "Measured speedup vs FLOPs reduction (compacted vs dense model)", width=4.5)
    for ax, col in zip(axes, measured):
        here = done[done[col].notna()]
        for (method, setting), rows in here.groupby(["method", "setting"]):
            style = styles(method, setting)
            ax.scatter(rows["flops_reduction"], rows[col], color=style["color"], marker=style["marker"],
                       label=f"{method} {setting}".strip())
        values = pd.concat([here["flops_reduction"], here[col]])
        low, high = values.min() / 1.2, values.max() * 1.2
        ax.plot([low, high], [low, high], color="gray", ls="--", label="y = x")
        _log(ax, "x")
        _log(ax, "y")
        ax.set(title=SPEEDUPS[col], xlabel="FLOPs reduction (dense / compact)",
               ylabel="latency speedup (dense / compact)")
        ax.grid(alpha=0.3, which="both")
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")
    return fig


def layer_widths(run_dir, title: str = "") -> Figure | None:
    """(f) bar chart of compact.json's {layer: [width_before, width_after]}."""
    path = Path(run_dir) / "compact.json"
    if not path.exists():
        return None
    widths = json.loads(path.read_text())
    names = list(widths)
    before, after = [widths[n][0] for n in names], [widths[n][1] for n in names]
    fig = Figure(figsize=(max(5.0, 0.5 * len(names) + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], before, width=0.4, color="lightgray", label="before")
    ax.bar([i + 0.2 for i in x], after, width=0.4, color="C0", label="after (kept)")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize="small")
    ax.set(title=f"Per-layer width before / after compaction\n{title}", xlabel="layer",
           ylabel="width (channels / units)")
    ax.legend()
    return fig


def save(fig: Figure, out: Path, name: str, command: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, metadata={"Description": command})
    fig.savefig(paths[1], metadata={"Subject": command})
    return paths


def figures(records: pd.DataFrame) -> dict[str, Figure | None]:
    """Every figure by file name (None when its data is absent); (f) for the first run of each setting
    that has compact.json. An empty dict when no run completed."""
    done = records[records["status"] == "completed"]
    if done.empty:
        return {}
    styles, table = Styles(records), aggregate(records)
    out = {"acc_vs_sparsity": acc_vs_sparsity(table, styles), "acc_vs_flops": acc_vs_flops(table, styles),
           "sparsity_over_epochs": sparsity_over_epochs(records, styles), "lambda_k": lambda_k(records),
           "speedup_vs_flops": speedup_vs_flops(records, styles)}
    compacted = done[[(Path(r) / "compact.json").exists() for r in done["run"]]]
    for _, row in compacted.groupby(KEYS).head(1).iterrows():
        title = f"{row['dataset']} / {row['model']} / {_label(row)} (seed {row['seed']})"
        slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", f"{row['dataset']}_{row['model']}_{_label(row)}").strip("_")
        out[f"widths_{slug}"] = layer_widths(row["run"], title)
    if compacted.empty:
        out["widths"] = None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/figures", help="output folder (default: results/figures)")
    parser.add_argument("--name", default="", help="prefix of the file names")
    args, records, command = parse_runs(parser, "scripts/plot.py", argv)
    drawn = figures(records)
    if not drawn:
        counts = records["status"].value_counts().to_dict()
        print(f"no completed run among {len(records)} ({', '.join(f'{n} {s}' for s, n in counts.items())}): "
              "no figure drawn")
    for name, fig in drawn.items():
        if fig is None:
            print(f"skipped {name}: no run has the data it needs")
            continue
        for path in save(fig, Path(args.out), args.name + name, command):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
