"""Units per layer after compaction beside error, FLOPs and speedups, as the LeNet-5-Caffe papers report them.

Units: each conv layer's filters, each linear layer's inputs (20-50-800-500 for the dense LeNet-5-Caffe), from
each completed run's compact.pt; one row per (model, method, setting) of make_table's aggregate: the rounded
mean over seeds and every seed's units, with the row's error, FLOPs reduction and measured speedups.

    python scripts/units_per_layer.py runs/table_mnist --out results/mnist_units.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _runs import KEYS, MD_COLUMNS, _mean_std, aggregate, parse_runs, table_lines


def units(run_dir) -> list[int] | None:
    """Conv filters and linear inputs of the compact model, in layer order; None without a compact.pt."""
    path = Path(run_dir) / "compact.pt"
    if not path.exists():
        return None
    layers = json.loads(torch.load(path, map_location="cpu", weights_only=True)["spec"])["layers"]
    return [s["out"] if s["type"] == "Conv2d" else s["in"] for s in layers.values()
            if s["type"] in ("Conv2d", "Linear")]


def per_seed_units(group) -> dict[int, list[int]] | None:
    """{seed: units} of a table row's completed runs; None when a run has no compact model or the models do
    not compare layer by layer."""
    per_seed = {int(r.seed): units(r.run) for r in group.itertuples()}
    if any(u is None for u in per_seed.values()) or len({len(u) for u in per_seed.values()}) != 1:
        return None
    return per_seed


def rows(records) -> list[list[str]]:
    """One row per (model, method, setting), read from make_table's aggregate: error (100 - final test acc)
    mean ± std over seeds, units per layer (rounded mean over seeds), FLOPs reduction, CPU and ONNX Runtime
    speedups at batch 1 / 64, and every seed's units."""
    done = records[records["status"] == "completed"]
    table = aggregate(records).set_index(KEYS)
    table["error_mean"], table["error_std"] = 1 - table["final_test_acc_mean"], table["final_test_acc_std"]
    percent, times = MD_COLUMNS["final_test_acc"][1], MD_COLUMNS["flops_reduction"][1]
    out = []
    for key, group in done.groupby(KEYS, sort=True):
        r = table.loc[key]
        if pd.notna(r["mean_width_mean"]):  # GBLR: its deployed layers are low-rank or tiled, not fewer units
            units_cell, seeds_cell = f"low-rank layers (mean width {r['mean_width_mean']:.3f})", "-"
        elif (per_seed := per_seed_units(group)) is not None:
            units_cell = "-".join(f"{m:.0f}" for m in np.mean(list(per_seed.values()), axis=0))
            seeds_cell = "; ".join(f"seed {s}: {'-'.join(map(str, u))}" for s, u in sorted(per_seed.items()))
        else:
            continue
        speedups = (" / ".join(_mean_std(r, f"speedup_{d}_b{b}", times) for b in (1, 64)) for d in ("cpu", "ort_cpu"))
        out.append([key[1], key[2], key[3] or "-", str(r["n_seeds"]), _mean_std(r, "error", percent), units_cell,
                    _mean_std(r, "flops_reduction", times), *speedups, seeds_cell])
    return out


HEAD = ["model", "method", "setting", "seeds", "error (%)", "units per layer", "FLOPs reduction (×)",
        "CPU speedup b1 / b64 (×)", "ONNX Runtime CPU speedup b1 / b64 (×)", "units per seed"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args, records, command = parse_runs(parser, "scripts/units_per_layer.py", argv)
    lines = [f"<!-- {command} -->", "",
             "Error = 100 − final test accuracy (%), mean ± sample std over seeds; units per layer after "
             "compaction (conv filters, linear inputs), rounded mean over seeds; FLOPs reduction and measured "
             "speedups of the compacted model against the dense one, as in the table from make_table.", "",
             *table_lines(HEAD, rows(records))]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
