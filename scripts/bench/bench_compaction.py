"""Compaction benchmark: zero a random half of every coupled filter group, compact, check the outputs,
and compare measured CPU speedup with the FLOPs reduction.

    python scripts/bench/bench_compaction.py [--threads 1] [--clock cpu] [--layouts nchw nhwc] [--repeats 5]
        [--min-run-time 0.5] [--onnxruntime] [--out results/compaction_bench]

--onnxruntime also times both models exported to ONNX in onnxruntime (CPU), beside PyTorch.

Writes <out>.csv and <out>.md, each starting with a comment line holding the command.
"""
import argparse
import csv
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from wgsef.compress import compact, zero_random_groups_
from wgsef.measure import measure_model
from wgsef.models import build

MODELS = {"lenet5": (1, 28), "vgg16": (3, 32), "resnet18": (3, 32), "mobilenetv1": (3, 32)}
COLUMNS = ["model", "input", "layout", "zeroed_channels", "max_abs_diff", "params_dense", "params_compact",
           "params_reduction", "flops_dense", "flops_compact", "flops_reduction",
           "latency_ms_cpu_b1_dense", "latency_ms_cpu_b1_compact", "speedup_cpu_b1",
           "latency_ms_cpu_b64_dense", "latency_ms_cpu_b64_compact", "speedup_cpu_b64",
           "speedup_b64_over_flops_reduction", "threads", "clock"]
ORT_COLUMNS = ["latency_ms_ort_cpu_b1_dense", "latency_ms_ort_cpu_b1_compact", "speedup_ort_cpu_b1",
               "latency_ms_ort_cpu_b64_dense", "latency_ms_ort_cpu_b64_compact", "speedup_ort_cpu_b64",
               "ort_over_pytorch_b64_compact"]
LAYOUTS = {"nchw": False, "nhwc": True}  # layout name -> channels_last
TARGET = {"vgg16": 0.85, "resnet18": 0.85}  # measured b64 speedup / FLOPs reduction at 50% filter sparsity


def randomize_bn_(model: nn.Module, generator: torch.Generator) -> None:
    """Random BN affine params and running stats, so a wrongly kept/removed channel shows in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.normal_(generator=generator)
            m.bias.data.normal_(generator=generator)
            m.running_mean.normal_(generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)


def bench(name: str, layout: str, args) -> dict:
    channels, side = MODELS[name]
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = build(name, num_classes=10, in_channels=channels, image_size=side).eval()
    randomize_bn_(model, generator)
    one = torch.randn(1, channels, side, side, generator=generator)
    zeroed = zero_random_groups_(model, one, 0.5, generator)
    small = compact(model, one).eval()
    x = torch.randn(8, channels, side, side, generator=generator)
    with torch.no_grad():
        diff = (model(x) - small(x)).abs().max().item()
    row = {"model": name, "input": f"{channels}x{side}x{side}", "layout": layout, "zeroed_channels": zeroed,
           "max_abs_diff": diff}
    row.update(measure_model(model, small, (channels, side, side), devices=("cpu",), batches=(1, 64),
                             threads=args.threads, min_run_time=args.min_run_time, repeats=args.repeats,
                             clock=args.clock, channels_last=LAYOUTS[layout], onnxruntime=args.onnxruntime))
    row["speedup_b64_over_flops_reduction"] = row["speedup_cpu_b64"] / row["flops_reduction"]
    if args.onnxruntime:  # how much faster onnxruntime runs the compact model than PyTorch does
        row["ort_over_pytorch_b64_compact"] = row["latency_ms_cpu_b64_compact"] / row["latency_ms_ort_cpu_b64_compact"]
    return row


def best_layout(rows: list[dict]) -> list[dict]:
    """Per model: each of dense and compact in its own fastest memory layout (as one would deploy them)."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        dense = min(mine, key=lambda r: r["latency_ms_cpu_b64_dense"])
        small = min(mine, key=lambda r: r["latency_ms_cpu_b64_compact"])
        speedup = dense["latency_ms_cpu_b64_dense"] / small["latency_ms_cpu_b64_compact"]
        target = TARGET.get(name)
        out.append({"model": name, "dense_layout": dense["layout"], "compact_layout": small["layout"],
                    "speedup_cpu_b64": speedup, "flops_reduction": dense["flops_reduction"],
                    "ratio": speedup / dense["flops_reduction"],
                    "target": f">= {target}" if target else "-",
                    "met": "n/a" if not target else ("yes" if speedup / dense["flops_reduction"] >= target else "NO")})
    return out


def markdown(rows: list[dict], columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(fmt(row[k]) for k in columns) + " |" for row in rows)]


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per latency measurement")
    parser.add_argument("--repeats", type=int, default=5, help="alternating dense/compact measurements")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: thread CPU time (needs --threads 1), robust on a shared machine")
    parser.add_argument("--onnxruntime", action="store_true", help="also time the ONNX exports in onnxruntime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/compaction_bench"))
    args = parser.parse_args(argv)
    command = "python " + shlex.join(["scripts/bench/bench_compaction.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    columns = COLUMNS + (ORT_COLUMNS if args.onnxruntime else [])
    rows = []
    for name in args.models:
        for layout in args.layouts:
            rows.append(bench(name, layout, args))
            print(" ".join(f"{k}={fmt(rows[-1][k])}" for k in columns), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        f.write(f"# {command}\n")
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: row[k] for k in columns} for row in rows)
    best = best_layout(rows)
    for row in best:
        print(f"{row['model']}: speedup_b64 {row['speedup_cpu_b64']:.3f} / flops_reduction {row['flops_reduction']:.3f}"
              f" = {row['ratio']:.3f} (dense {row['dense_layout']}, compact {row['compact_layout']}; target {row['target']})")
    lines = [f"<!-- {command} -->", "", "Each model in its fastest memory layout (batch 64, CPU):", "",
             *markdown(best, list(best[0])), "", "Every layout:", "", *markdown(rows, columns)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
