"""Figures from run directories, each saved as PNG and PDF (the command that made it in the metadata).

    python scripts/plot.py runs/multirun/table1 --out results/figures [--name table1_]

(a) acc_vs_sparsity: final test accuracy vs group sparsity, one curve per method over its sweep
(b) sparsity_over_epochs: group sparsity, nonzero groups and k per epoch (metrics.csv)
(c) speedup_vs_flops: measured latency speedup vs FLOPs reduction, with y = x
(d) widths_<run>: per-layer widths before / after compaction (compact.json), one per setting
A figure whose data no run has is skipped with a printed note. The functions return matplotlib Figures
(no pyplot state), so the notebook shows the same figures.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from _runs import KEYS, aggregate, load_metrics, parse_runs

SPEEDUPS = {"speedup_cpu_b1": "CPU, batch 1", "speedup_cpu_b64": "CPU, batch 64",
            "speedup_cuda_b1": "GPU, batch 1", "speedup_cuda_b64": "GPU, batch 64"}


def _label(row) -> str:
    return " ".join(str(x) for x in (row["method"], row["setting"]) if x)


def _panels(n: int, title: str, width: float = 5.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * n, 4.0), layout="constrained")
    fig.suptitle(title)
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def acc_vs_sparsity(table: pd.DataFrame) -> Figure | None:
    """(a) from `aggregate`'s table: one panel per (dataset, model); method 'none' as a dense reference line."""
    table = table[table["final_test_acc_mean"].notna()]
    sparse = table[table["group_sparsity_mean"].notna()]
    if sparse.empty:
        return None
    pairs = sorted(sparse.groupby(["dataset", "model"]).groups)
    fig, axes = _panels(len(pairs), "Accuracy vs group sparsity over a sweep")
    for ax, (dataset, model) in zip(axes, pairs):
        here = table[(table["dataset"] == dataset) & (table["model"] == model)]
        for method, rows in here.groupby("method"):
            rows = rows.sort_values("group_sparsity_mean")
            if rows["group_sparsity_mean"].notna().any():
                ax.errorbar(100 * rows["group_sparsity_mean"], 100 * rows["final_test_acc_mean"],
                            yerr=100 * rows["final_test_acc_std"].fillna(0), marker="o", capsize=3, label=method)
            elif method == "none":
                ax.axhline(100 * rows["final_test_acc_mean"].max(), color="gray", ls="--", label="dense (none)")
        ax.set(title=f"{dataset} / {model}", xlabel="group sparsity (% groups zero)",
               ylabel="final test accuracy (%), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def sparsity_over_epochs(records: pd.DataFrame) -> Figure | None:
    """(b) group sparsity (left) and nonzero groups with the target k dashed (right) per epoch, per run."""
    curves = [(row, m) for _, row in records.iterrows()
              if (m := load_metrics(row["run"])) is not None and "group_sparsity" in m]
    if not curves:
        return None
    fig, (left, right) = _panels(2, "Sparsity during training", width=5.0)
    for i, (row, m) in enumerate(curves):
        color = f"C{i % 10}"
        left.plot(m["epoch"], 100 * m["group_sparsity"], color=color, label=f"{_label(row)} seed {row['seed']}")
        if "nonzero_groups" in m:
            right.plot(m["epoch"], m["nonzero_groups"], color=color)
        if "k" in m:
            right.plot(m["epoch"], m["k"], color=color, ls="--")
    left.set(title="group sparsity", xlabel="epoch", ylabel="groups zero (%)")
    right.set(title="nonzero groups vs target k", xlabel="epoch", ylabel="groups")
    right.legend([Line2D([], [], color="k"), Line2D([], [], color="k", ls="--")], ["nonzero groups", "k"])
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*left.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return fig


def speedup_vs_flops(records: pd.DataFrame) -> Figure | None:
    """(c) one panel per measured device / batch size, one point per completed run."""
    done = records[(records["status"] == "completed") & records["flops_reduction"].notna()]
    measured = [c for c in SPEEDUPS if done[c].notna().any()]
    if not measured:
        return None
    fig, axes = _panels(len(measured), "Measured speedup vs FLOPs reduction (compacted vs dense model)", width=4.5)
    for ax, col in zip(axes, measured):
        for i, (method, rows) in enumerate(done.groupby("method")):
            ax.scatter(rows["flops_reduction"], rows[col], color=f"C{i % 10}", label=method)
        top = max(done["flops_reduction"].max(), done[col].max()) * 1.05
        ax.plot([1, top], [1, top], color="gray", ls="--", label="y = x")
        ax.set(title=SPEEDUPS[col], xlabel="FLOPs reduction (dense / compact)",
               ylabel="latency speedup (dense / compact)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def layer_widths(run_dir, title: str = "") -> Figure | None:
    """(d) bar chart of compact.json's {layer: [width_before, width_after]}."""
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
    """Every figure by file name (None when its data is absent); (d) for the first run of each setting
    that has compact.json."""
    done = records[records["status"] == "completed"]
    out = {"acc_vs_sparsity": acc_vs_sparsity(aggregate(records)),
           "sparsity_over_epochs": sparsity_over_epochs(records),
           "speedup_vs_flops": speedup_vs_flops(records)}
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
    for name, fig in figures(records).items():
        if fig is None:
            print(f"skipped {name}: no run has the data it needs")
            continue
        for path in save(fig, Path(args.out), args.name + name, command):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
