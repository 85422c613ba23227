"""CPU latency of GBLR's deployable forms (wgsef.regularizers.gblr.deploy) against the dense layer.

For each layer shape and width budget: a GBLR layer with ratio 1, rank 1, every width set to the budget
and random locations; the dense baseline runs the same (materialised) weight with nn.Linear / nn.Conv2d.
Each exact form (tiled, low-rank) is timed (median of torch.utils.benchmark at a fixed thread count),
and `deployed` is what GBLR.finalize would choose at that batch (gblr.deploy.fastest: a non-dense form
only when >= 10% faster than dense), timed again on its own. Writes results/gblr_latency.csv (first
line: the command) and prints where the deployed form is slower than dense.

    python scripts/bench/bench_gblr.py [--threads 1] [--min-run-time 0.3] [--out results/gblr_latency.csv]
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from wgsef.regularizers.gblr.deploy import fastest, to_inference, to_lowrank
from wgsef.regularizers.gblr.layers import GBLRConv2d, GBLRLinear, dense_flops, gblr_flops

# (name, dense layer factory, input shape without batch, batch sizes)
LAYERS = [
    ("linear 512x512", lambda: nn.Linear(512, 512), (512,), (1, 64)),
    ("linear 1024x1024", lambda: nn.Linear(1024, 1024), (1024,), (1, 64)),
    ("linear 4096x1024", lambda: nn.Linear(1024, 4096), (1024,), (1, 64)),
    ("conv 64-64 3x3 @32x32", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 32, 32), (1, 16)),
    ("conv 256-256 3x3 @8x8", lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 8, 8), (1, 16)),
]
WIDTHS = (0.5, 0.25, 0.1, 0.05)


def median_us(fn, x, threads: int, min_run_time: float) -> float:
    """Median time of fn(x); on one thread by the thread's CPU clock (steady on a shared machine)."""
    timer = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads,
                            timer=time.thread_time if threads == 1 else time.perf_counter)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def gblr_layer(dense: nn.Module, width: float, seed: int):
    torch.manual_seed(seed)
    layer = (GBLRConv2d if isinstance(dense, nn.Conv2d) else GBLRLinear)(dense, 1.0, 1, init="scratch")
    with torch.no_grad():
        layer.widths.fill_(width)
        layer.locations.uniform_(0, 1)
    return layer


@torch.no_grad()
def run(threads: int, min_run_time: float) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, factory, in_shape, batches in LAYERS:
        dense = factory().eval()
        for width in WIDTHS:
            layer = gblr_layer(dense, width, seed=0).eval()  # deployment reproduces eval mode
            dense.weight.copy_(layer.materialize().view_as(dense.weight))  # same function
            for batch in batches:
                x = torch.randn(batch, *in_shape)
                layer(x)  # records a conv's output size, which the tile planner uses
                forms = {"dense": dense, "tiled": to_inference(layer, batch_hint=batch), "lowrank": to_lowrank(layer)}
                out_hw = getattr(layer, "out_hw", None)
                for form_name, form in forms.items():
                    err = float((form(x) - dense(x)).abs().max())
                    if err > 1e-3:
                        raise RuntimeError(f"{name} width {width}: {form_name} form differs from dense by {err}")
                us = {k: median_us(f, x, threads, min_run_time) for k, f in forms.items()}
                choice = fastest(forms, [x], margin=0.1, repeats=3, min_run_time=0.05)  # the finalize defaults
                t_deployed = median_us(forms[choice], x, threads, min_run_time)
                rows.append({
                    "layer": name, "batch": batch, "width": width,
                    "flops_ratio": round(gblr_flops(layer, out_hw) / dense_flops(layer, out_hw), 4),
                    "executed_ratio": round(forms["tiled"].macs_per_column / (layer.m * layer.n), 4),
                    "tiles": f"{len(forms['tiled'].right.tiles)}+{len(forms['tiled'].left.tiles)}",
                    "dense_us": round(us["dense"], 1), "tiled_us": round(us["tiled"], 1),
                    "lowrank_us": round(us["lowrank"], 1), "deployed": choice, "deployed_us": round(t_deployed, 1),
                    "speedup": round(us["dense"] / t_deployed, 3)})
                r = rows[-1]
                print(f"{name:24s} batch {batch:3d} width {width:5.2f} FLOPs {r['flops_ratio']:.3f}: dense "
                      f"{r['dense_us']:9.1f} us, tiled {r['tiled_us']:9.1f}, low-rank {r['lowrank_us']:9.1f} -> "
                      f"{choice} x{r['speedup']:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    parser.add_argument("--out", type=Path, default=Path("results/gblr_latency.csv"))
    args = parser.parse_args()
    rows = run(args.threads, args.min_run_time)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        f.write(f"# python {' '.join(sys.argv)}  (torch {torch.__version__}, {args.threads} thread(s), "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"load average {os.getloadavg()[0]:.1f} at the end)\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = [r for r in rows if r["deployed"] != "dense"]
    slower = [r for r in chosen if r["speedup"] < 1]
    print(f"\nwrote {args.out}: {len(rows)} rows; a non-dense form deployed in {len(chosen)}, slower than dense "
          f"when re-timed in {len(slower)} of them (where dense is deployed, speedup is the same module timed "
          f"twice: timing noise):")
    for r in slower:
        print(f"  {r['layer']}, batch {r['batch']}, width {r['width']} ({r['deployed']}): x{r['speedup']}")


if __name__ == "__main__":
    main()
