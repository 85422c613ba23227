"""Units per layer after compaction, in the notation of the LeNet-5-Caffe papers: each conv layer's filters,
each linear layer's inputs (20-50-800-500 for the dense LeNet-5-Caffe), from each completed run's compact.pt;
one row per (model, method, setting): the rounded mean over seeds and every seed's units.

    python scripts/units_per_layer.py runs/table_mnist --out results/mnist_units.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from _runs import parse_runs


def units(run_dir) -> list[int] | None:
    """Conv filters and linear inputs of the compact model, in layer order; None without a compact.pt."""
    path = Path(run_dir) / "compact.pt"
    if not path.exists():
        return None
    layers = json.loads(torch.load(path, map_location="cpu", weights_only=True)["spec"])["layers"]
    return [s["out"] if s["type"] == "Conv2d" else s["in"] for s in layers.values()
            if s["type"] in ("Conv2d", "Linear")]


def rows(records) -> list[dict]:
    done = records[records["status"] == "completed"]
    out = []
    for (model, method, setting), group in done.groupby(["model", "method", "setting"], sort=False):
        per_seed = {int(r.seed): u for r in group.itertuples() if (u := units(r.run)) is not None}
        shapes = {len(u) for u in per_seed.values()}
        if len(shapes) != 1:
            continue  # no compact model, or models that do not compare layer by layer
        mean = np.mean(list(per_seed.values()), axis=0)
        out.append({"model": model, "method": method, "setting": setting, "seeds": len(per_seed),
                    "units": "-".join(f"{m:.0f}" for m in mean),
                    "per_seed": "; ".join(f"seed {s}: {'-'.join(map(str, u))}" for s, u in sorted(per_seed.items()))})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args, records, command = parse_runs(parser, "scripts/units_per_layer.py", argv)
    lines = [f"<!-- {command} -->", "",
             "Units per layer after compaction (conv filters, linear inputs), rounded mean over seeds.", "",
             "| model | method | setting | seeds | units per layer | per seed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['setting'] or '-'} | {r['seeds']} | {r['units']} | "
              f"{r['per_seed']} |" for r in rows(records)]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
