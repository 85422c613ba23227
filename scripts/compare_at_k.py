"""Methods side by side at matched sparsity: from a make_table CSV, one block per kept fraction of groups.

    python scripts/compare_at_k.py results/demo.csv --out results/demo_at_k.md

k-based methods (wgsef, wgsef_cont, magnitude, wgsef+hspg) sit at their k; lambda-based ones (group lasso,
HSPG) at the target nearest to their measured kept fraction (1 - group sparsity), when within --tolerance.
Dense is the reference line. SSL (its sparsity pools filter and shape groups), SR-STE and GBLR have no
comparable kept fraction of filter groups and are left out. Every number is read from the CSV.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from _runs import MD_COLUMNS, PLACE_TOLERANCE, _mean_std, command_line

NOT_COMPARED = {"dense", "ssl", "srste", "gblr"}
K_SETTING = re.compile(r"(?:^|, )k=([0-9.]+)")


def kept_fraction(row) -> tuple[float, str]:
    """(kept fraction of groups, where it comes from): k from the setting, else 1 - group sparsity."""
    k = K_SETTING.search(str(row["setting"]) if pd.notna(row["setting"]) else "")
    if k and float(k.group(1)) < 1:
        return float(k.group(1)), "k"
    return 1 - row["group_sparsity_mean"], "measured"


def at_targets(table: pd.DataFrame, targets, tolerance: float) -> pd.DataFrame:
    rows = table[table["group_sparsity_mean"].notna()].copy()
    rows[["kept", "kept_from"]] = rows.apply(lambda r: pd.Series(kept_fraction(r)), axis=1)
    rows["target"] = rows["kept"].map(lambda kept: min(targets, key=lambda t: abs(t - kept)))
    rows = rows[(rows["kept"] - rows["target"]).abs() <= tolerance]
    return rows.sort_values(["target", "final_test_acc_mean"], ascending=[True, False])


def pm(row, metric: str) -> str:
    """mean ± std of `metric`, formatted as make_table's markdown formats it."""
    return _mean_std(row, metric, MD_COLUMNS[metric][1])


def markdown(rows: pd.DataFrame, dense: pd.DataFrame, command: str) -> str:
    lines = [f"<!-- command: {command} -->", "",
             "Kept fraction of groups: k for k-based methods, 1 − group sparsity (mean over seeds) for "
             "λ-based ones. Accuracy is the final model's test accuracy, mean ± sample std over seeds."]
    for _, d in dense.iterrows():
        lines += ["", f"Dense reference ({d['dataset']} / {d['model']}, seeds: {d['n_seeds']}): "
                      f"{pm(d, 'final_test_acc')} %."]
    head = ["kept (target)", "method", "setting", "seeds", "kept fraction", "final test acc (%)",
            "FLOPs reduction (×)", "CPU speedup b64 (×)"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in rows.iterrows():
        cells = [f"{r['target']:.2f}", r["method"], r["setting"] or "-", r["n_seeds"],
                 f"{r['kept']:.2f} ({r['kept_from']})", pm(r, "final_test_acc"),
                 pm(r, "flops_reduction"), pm(r, "speedup_cpu_b64")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="a CSV written by scripts/make_table.py")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--tolerance", type=float, default=PLACE_TOLERANCE, help="largest |kept - target| shown")
    args = parser.parse_args(argv)
    try:
        table = pd.read_csv(args.table, comment="#", keep_default_na=True)
    except FileNotFoundError:
        parser.exit(2, f"error: {args.table} not found: run scripts/make_table.py first\n")
    table["setting"] = table["setting"].fillna("")
    dense = table[table["method"] == "dense"]
    text = markdown(at_targets(table[~table["method"].isin(NOT_COMPARED)], args.targets, args.tolerance), dense,
                    command_line("scripts/compare_at_k.py", argv))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
