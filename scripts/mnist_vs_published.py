"""Our MNIST rows beside the published LeNet-5-Caffe rows, on one FLOPs count: a table and a figure.

The published rows (docs/published/lenet5_caffe_mnist.csv, quoted with their sources in docs/mnist.md) give
units per layer; each paper counts FLOPs its own way (or not at all), so their FLOPs reduction is recomputed
here from those units with the count our runs use (multiply-accumulates of the conv and linear layers, as
count_flops of wgsef/measure.py counts them on the compacted model). Our rows come from make_table's CSV.

    python scripts/mnist_vs_published.py results/mnist.csv --out results/mnist_published.md \\
        --figure results/figures/mnist/vs_published.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from _runs import command_line, table_lines
from plot import DENSE, DOUBLE, ROW, Styles, _legend_below, _log, paper, save

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "published" / "lenet5_caffe_mnist.csv"
DENSE_UNITS = (20, 50, 800, 500)


def lenet5_caffe_macs(units, image_size: int = 28) -> int:
    """Multiply-accumulates of LeNet-5-Caffe's conv and linear layers at `units` (conv1 filters, conv2 filters,
    fc1 inputs, fc2 inputs): 5x5 valid convolutions, each followed by a 2x2 max-pool, 10 classes. fc1's inputs
    need not be 16 x conv2's filters (SBP and L0 remove single inputs)."""
    c1, c2, f1, f2 = units
    s1 = image_size - 4  # conv1's output side; pooled, then conv2's
    s2 = s1 // 2 - 4
    return c1 * s1 * s1 * 25 + c2 * s2 * s2 * 25 * c1 + f1 * f2 + f2 * 10


def flops_reduction(units) -> float:
    return lenet5_caffe_macs(DENSE_UNITS) / lenet5_caffe_macs(units)


def published(path: Path = PUBLISHED) -> pd.DataFrame:
    """The quoted rows with their FLOPs reduction by our count (`flops_reduction`)."""
    rows = pd.read_csv(path, comment="#")
    rows["flops_reduction"] = [flops_reduction(tuple(map(int, u.split("-")))) for u in rows["units"]]
    return rows


def ours(table: pd.DataFrame, model: str = "lenet5_caffe") -> pd.DataFrame:
    """make_table's rows of `model` with an accuracy and a FLOPs reduction, error in percent."""
    rows = table[(table["model"] == model) & table["final_test_acc_mean"].notna()
                 & table["flops_reduction_mean"].notna()].copy()
    rows["setting"] = rows["setting"].fillna("").astype(str)
    rows["error"] = 100 * (1 - rows["final_test_acc_mean"])
    rows["error_std"] = 100 * rows["final_test_acc_std"].fillna(0)
    return rows


def markdown(pub: pd.DataFrame, command: str) -> str:
    def cell(x) -> str:
        return "–" if pd.isna(x) else f"{x:.2f}"

    cells = [[r.method, f"{r.error:.2f}", r.units, f"{r.flops_reduction:.2f}", cell(r.reported_flops_reduction),
              cell(r.reported_cpu_speedup), r.source] for r in pub.itertuples()]
    head = ["method", "error (%)", "units per layer", "FLOPs reduction, our count (×)",
            "FLOPs reduction, as reported (×)", "CPU speedup, as reported (×)", "source"]
    return "\n".join([f"<!-- command: {command} -->", "",
                      "Published LeNet-5-Caffe rows on MNIST as quoted in docs/mnist.md (how each was trained, "
                      "what we could not verify); FLOPs reduction recomputed from their units per layer with "
                      "the count of our rows (conv and linear multiply-accumulates), beside what the source "
                      "reports.", "", *table_lines(head, cells)]) + "\n"


def spread(x: pd.Series, step: float = 1.025) -> pd.Series:
    """x moved sideways by factors of `step` where several rows share a value (to 3 significant digits), centred
    on it, so that rows at the same FLOPs reduction (every k-based method at one k) do not hide each other."""
    key = x.map(lambda v: f"{v:.3g}")
    rank = x.groupby(key).cumcount()
    return x * step ** (rank - (key.map(key.value_counts()) - 1) / 2)


def figure(our: pd.DataFrame, pub: pd.DataFrame) -> Figure:
    """Error against FLOPs reduction (log x), our rows (mean ± std over seeds) and the published ones (black
    crosses, named) on the same count."""
    styles = Styles(our)
    with paper():
        fig = Figure(figsize=(DOUBLE, 1.6 * ROW), layout="constrained")
        ax = fig.subplots()
        for r, x in zip(our.itertuples(), spread(our["flops_reduction_mean"])):
            style = styles(r.method, r.setting)
            seeds = f"{r.n_seeds} seed" + ("s" if r.n_seeds != 1 else "")
            ax.errorbar(x, r.error, yerr=r.error_std, color=style["color"], marker=style["marker"],
                        markersize=7 if r.method in DENSE else None, ls="none",
                        label=f"ours: {r.method} {r.setting}".strip() + f" ({seeds})")
        ax.scatter(pub["flops_reduction"], pub["error"], marker="x", color="black", s=18, zorder=3,
                   label="published (units per layer on our FLOPs count)")
        for r in pub.itertuples():
            ax.annotate(r.label, (r.flops_reduction, r.error), xytext=(2, 3), textcoords="offset points",
                        fontsize=6, rotation=30, zorder=1.5)  # under the markers: a label never hides a row
        _log(ax, "x")
        ax.set(title="LeNet-5-Caffe on MNIST: ours (12 epochs) beside the published rows (mostly 200 epochs)",
               xlabel="FLOPs reduction (dense / compact, conv + linear MACs; rows at one value spread sideways)",
               ylabel="test error (%)")
        ax.grid(alpha=0.3, which="both")
        _legend_below(fig)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="make_table's CSV of the MNIST runs (results/mnist.csv)")
    parser.add_argument("--published", default=str(PUBLISHED), help="the quoted rows (CSV)")
    parser.add_argument("--out", required=True, help="markdown file to write (the published rows, both counts)")
    parser.add_argument("--figure", required=True, help="the figure's PNG path (its PDF goes beside it)")
    args = parser.parse_args(argv)
    for path, hint in ((args.table, ": run `make mnist-report` first"), (args.published, "")):
        if not Path(path).exists():
            parser.exit(2, f"error: {path} not found{hint}\n")
    pub = published(Path(args.published))
    our = ours(pd.read_csv(args.table, comment="#", dtype={"setting": str}))
    if our.empty:
        parser.exit(2, f"error: {args.table} has no lenet5_caffe row with an accuracy and a FLOPs reduction\n")
    command = command_line("scripts/mnist_vs_published.py", argv)
    Path(args.out).write_text(markdown(pub, command))
    print(f"wrote {args.out}")
    out = Path(args.figure)
    for path in save(figure(our, pub), out.parent, out.stem, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
