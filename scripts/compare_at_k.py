"""Methods side by side at matched sparsity, and paired differences over seeds with 95 % confidence intervals.

    python scripts/compare_at_k.py results/demo.csv --out results/demo_at_k.md [--runs results/demo_runs.csv]

From a make_table CSV, one block per kept fraction of groups. k-based methods (wgsef, wgsef_cont, gmp,
magnitude, wgsef+hspg) sit at their k; lambda-based ones (group lasso, HSPG) at the target nearest to their
measured kept fraction (1 - group sparsity), when within --tolerance. A row with a collapsed run (final test
accuracy at most 2 x chance: the one definition, scripts/_runs.py and docs/metrics.md) is not placed. A method
that has no row on a target without collapsing gets one row saying "did not reach the target" (and its nearest
attempt) instead of a number. Dense is the reference line. SSL (its sparsity pools filter and shape groups),
SR-STE and GBLR have no comparable kept fraction of filter groups and are left out.

Paired differences (from the per-run CSV that make_table writes beside the table, <name>_runs.csv): for each
pair in PAIRS and each target where both are on target, the final test accuracy of A minus B seed by seed
(runs paired by seed), its mean and the 95 % paired t interval mean ± t_{0.975, n-1} sd / sqrt(n). A method is
"ahead" only where the interval excludes zero. Every number is read from the CSVs.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd
from scipy import stats

from _runs import COLLAPSE_FACTOR, MD_COLUMNS, PLACE_TOLERANCE, _mean_std, command_line, table_lines

NOT_COMPARED = {"dense", "ssl", "srste", "gblr"}
K_SETTING = re.compile(r"(?:^|, )k=([0-9.]+)")
# wgsef_cont against its control (gmp), the one-shot cut and group lasso; gmp against the one-shot cut (is
# "gradual" what helps?); WGSEF's top-k finish against magnitude (what the shrinkage adds)
PAIRS = [("wgsef_cont", "gmp"), ("wgsef_cont", "magnitude"), ("wgsef_cont", "group_lasso"), ("gmp", "magnitude"),
         ("wgsef", "magnitude")]
MISSED = "did not reach the target"


def kept_fraction(row) -> tuple[float, str]:
    """(kept fraction of groups, where it comes from): k from the setting, else 1 - group sparsity."""
    k = K_SETTING.search(str(row["setting"]) if pd.notna(row["setting"]) else "")
    if k and float(k.group(1)) < 1:
        return float(k.group(1)), "k"
    return 1 - row["group_sparsity_mean"], "measured"


def placed(table: pd.DataFrame, targets, tolerance: float) -> pd.DataFrame:
    """Every row with its kept fraction, nearest target and `on_target` (within tolerance, not collapsed)."""
    rows = table[table["group_sparsity_mean"].notna()].copy()
    kept = [kept_fraction(r) for _, r in rows.iterrows()]
    rows["kept"], rows["kept_from"] = [k for k, _ in kept], [f for _, f in kept]
    rows["target"] = rows["kept"].map(lambda kept: min(targets, key=lambda t: abs(t - kept)))
    rows["collapsed"] = rows["n_collapsed"] > 0
    rows["on_target"] = ((rows["kept"] - rows["target"]).abs() <= tolerance) & ~rows["collapsed"]
    return rows


def at_targets(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["on_target"]].sort_values(["target", "final_test_acc_mean"], ascending=[True, False])


def missed(rows: pd.DataFrame, targets, tolerance: float) -> list[dict]:
    """Per target, each method without an on-target row there that tried it (a lambda-based method tries
    every target; a k-based one its own k), with its nearest attempt."""
    out = []
    for method, own in rows.groupby("method"):
        tried = set(targets) if (own["kept_from"] == "measured").any() else set(own["target"])
        for target in sorted(tried):
            if own[own["on_target"] & (own["target"] == target)].empty:
                near = own.loc[(own["kept"] - target).abs().idxmin()]
                why = "collapsed" if near["collapsed"] and abs(near["kept"] - target) <= tolerance else "nearest"
                out.append({"target": target, "method": method, "near": near, "why": why})
    return out


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired t interval mean ± t_{(1+level)/2, n-1} sd / sqrt(n); n >= 2."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(a: str, b: str, low: float, high: float) -> str:
    if low > 0:
        return f"{a} ahead"
    if high < 0:
        return f"{b} ahead"
    return "no clear difference (interval contains 0)"


def paired_rows(on_target: pd.DataFrame, runs: pd.DataFrame, targets) -> list[list[str]]:
    """One line per (target, pair) with both methods on target: the paired difference in percentage points."""
    done = runs[runs["status"] == "completed"]
    lines = []
    for target in targets:
        here = on_target[on_target["target"] == target]
        for a, b in PAIRS:
            best = [here[here["method"] == m].sort_values(["n_seeds", "final_test_acc_mean"], ascending=False)
                    for m in (a, b)]
            if any(x.empty for x in best):
                continue
            ra, rb = (x.iloc[0] for x in best)
            acc = [done[(done["method"] == r["method"]) & (done["setting"] == r["setting"])
                        & (done["dataset"] == r["dataset"]) & (done["model"] == r["model"])]
                   .groupby("seed")["final_test_acc"].mean() for r in (ra, rb)]
            both = pd.concat(acc, axis=1, join="inner").dropna()
            label = f"{a} ({ra['setting'] or '-'}) − {b} ({rb['setting'] or '-'})"
            if len(both) < 2:
                lines.append([f"{target:.2f}", label, str(len(both)), "n/a", "n/a", "fewer than 2 paired seeds"])
                continue
            mean, low, high = paired_interval((100 * (both.iloc[:, 0] - both.iloc[:, 1])).tolist())
            lines.append([f"{target:.2f}", label, str(len(both)), f"{mean:+.2f}", f"[{low:+.2f}, {high:+.2f}]",
                          verdict(a, b, low, high)])
    return lines


def pm(row, metric: str) -> str:
    """mean ± std of `metric`, formatted as make_table's markdown formats it."""
    return _mean_std(row, metric, MD_COLUMNS[metric][1])


def markdown(rows: pd.DataFrame, misses: list[dict], dense: pd.DataFrame, pairs: list[list[str]] | None,
             runs_path: str, command: str) -> str:
    lines = [f"<!-- command: {command} -->", "",
             "Kept fraction of groups: k for k-based methods, 1 − group sparsity (mean over seeds) for "
             "λ-based ones. Accuracy is the final model's test accuracy, mean ± sample std over seeds. "
             f"\"{MISSED}\": no setting of the method kept that fraction (within the tolerance) without "
             f"a collapsed run (final test accuracy at most {COLLAPSE_FACTOR:g} × chance)."]
    for _, d in dense.iterrows():
        lines += ["", f"Dense reference ({d['dataset']} / {d['model']}, seeds: {d['n_seeds']}): "
                      f"{pm(d, 'final_test_acc')} %."]
    cells = [[f"{r['target']:.2f}", r["method"], r["setting"] or "-", r["n_seeds"],
              f"{r['kept']:.2f} ({r['kept_from']})", pm(r, "final_test_acc"), pm(r, "flops_reduction"),
              pm(r, "speedup_cpu_b64")] for _, r in rows.iterrows()]
    for m in misses:
        near = m["near"]
        note = (f"{MISSED} ({m['why']}: {near['setting'] or '-'} keeps {near['kept']:.2f} at "
                f"{pm(near, 'final_test_acc')} %)")
        cells.append([f"{m['target']:.2f}", m["method"], "-", "-", note, "-", "-", "-"])
    cells.sort(key=lambda c: c[0])  # stable: within a target, ranked rows first, then the misses
    head = ["kept (target)", "method", "setting", "seeds", "kept fraction", "final test acc (%)",
            "FLOPs reduction (×)", "CPU speedup b64 (×)"]
    lines += ["", *table_lines(head, cells), "", "## Paired differences over seeds", "",
              pairs_markdown(pairs, runs_path)]
    return "\n".join(lines)


def pairs_markdown(pairs: list[list[str]] | None, runs_path: str) -> str:
    """The paired-differences table with its legend (also written alone by --pairs-out: the README's headline)."""
    if pairs is None:
        return f"No per-run table ({runs_path}): run scripts/make_table.py, which writes it.\n"
    lines = ["Final test accuracy of A minus B in percentage points, runs paired by seed; 95 % paired t interval "
             "(mean ± t_{0.975, n−1} · sd / √n). A method is ahead only where the interval excludes 0.", ""]
    lines += table_lines(["kept (target)", "A − B", "paired seeds", "mean (pp)", "95 % CI (pp)", "verdict"],
                         pairs) if pairs else ["No pair has both methods on a target."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="a CSV written by scripts/make_table.py")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--pairs-out", help="also write the paired differences alone to this markdown file")
    parser.add_argument("--runs", help="its per-run CSV (default: <table stem>_runs.csv beside it)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--tolerance", type=float, default=PLACE_TOLERANCE, help="largest |kept - target| shown")
    args = parser.parse_args(argv)
    try:
        table = pd.read_csv(args.table, comment="#", keep_default_na=True, dtype={"setting": str})
    except FileNotFoundError:
        parser.exit(2, f"error: {args.table} not found: run scripts/make_table.py first\n")
    if "n_collapsed" not in table:
        parser.exit(2, f"error: {args.table} has no n_collapsed column: re-run scripts/make_table.py on its runs\n")
    table["setting"] = table["setting"].fillna("")
    dense = table[table["method"] == "dense"]
    rows = placed(table[~table["method"].isin(NOT_COMPARED)], args.targets, args.tolerance)
    runs_path = args.runs or str(Path(args.table).with_name(Path(args.table).stem + "_runs.csv"))
    pairs = None
    if Path(runs_path).exists():
        runs = pd.read_csv(runs_path, comment="#", dtype={"setting": str})
        runs["setting"] = runs["setting"].fillna("")
        pairs = paired_rows(at_targets(rows), runs, args.targets)
    command = command_line("scripts/compare_at_k.py", argv)
    text = markdown(at_targets(rows), missed(rows, args.targets, args.tolerance), dense, pairs, runs_path, command)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if args.pairs_out:
        Path(args.pairs_out).write_text(f"<!-- command: {command} -->\n\n{pairs_markdown(pairs, runs_path)}")
        print(f"wrote {args.pairs_out}")


if __name__ == "__main__":
    main()
