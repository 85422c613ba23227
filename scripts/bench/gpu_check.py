"""Everything that needs a GPU, in one command (< 8 minutes on one H100): `make gpu-check`.

    python scripts/bench/gpu_check.py [--cpu] [--budget 360] [--out results/gpu_check.md]

Sections, each run even when an earlier one failed (the exit code is 1 when any failed):
  1. the CUDA-only tests (the tests with `cuda` in their name, in the files that mention CUDA);
  2. one epoch of every method preset (configs/method/, but ssl_from_dense, which needs a dense run) on
     synthetic CIFAR-10-format data (`dataset.synthetic`), through wgsef.run.run as `experiments.train`
     runs it: training, finalize, compaction and the latency of dense vs compacted model on every device;
  3. ms, operator calls and host syncs per training step of each method against dense
     (scripts/bench/bench_step.py: ResNet18 and VGG16, batch 128, fp32 and bf16);
  4. the WGSEF prox on 11.2M values (ResNet18's weights) against torch.sort of them (scripts/bench/bench_prox.py);
  5. 2:4 semi-structured vs dense Linear (scripts/bench/bench_nm.py);
  6. the CUDA latency of a compacted model (from section 2's WGSEF run).
Writes the report (first line: the command) to --out. Without CUDA, or with --cpu, every section runs at
tiny sizes on the CPU (the test suite runs it so: tests/test_train.py) and CUDA-only parts say why they
were skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import bench_nm
import bench_prox
import bench_step

ROOT = Path(__file__).resolve().parents[2]
RESNET18_PARAMS = bench_prox.RESNET18_PARAMS


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: GPU (the real check) or CPU (tiny, for the test suite)."""
    run_model: tuple[str, ...]  # model overrides of the one-epoch runs
    run_images: int
    run_batch: int
    step_models: tuple[str, ...]
    step_precisions: tuple[str, ...]
    step_batch: int
    step_steps: int
    step_width: float
    prox_n: int
    nm_sizes: tuple[str, ...]
    latency_batches: str
    min_run_time: float
    cpu_threads: int  # torch threads of the CPU latency measurement in section 2


GPU = Sizes(("model=resnet18",), 128 * 40, 128, ("resnet18", "vgg16"), ("fp32", "bf16"), 128, 12, 1.0,
            RESNET18_PARAMS, ("64x4096x4096", "2048x4096x11008"), "[1,128]", 0.2, min(8, os.cpu_count() or 1))
CPU = Sizes(("model=vgg16", "model.width=0.0625"), 64, 32, ("vgg16",), ("fp32",), 4, 3, 0.0625, 100_000, (),
            "[1]", 0.01, 1)


def section(title: str):
    """Run a section, returning (markdown lines, ok); an exception becomes its traceback in the report."""
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                lines, ok = fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - reported, and the other sections still run
                lines, ok = ["```", traceback.format_exc().strip(), "```"], False
            took = time.perf_counter() - t0
            print(f"[{'ok' if ok else 'FAILED'}] {title} ({took:.0f} s)", flush=True)
            return [f"## {title} — {'ok' if ok else 'FAILED'} ({took:.0f} s)", "", *lines, ""], ok
        return run
    return wrap


@section("1. CUDA-only tests")
def cuda_tests(cuda: bool):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "torch.cuda.is_available()" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", *files]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = r.stdout.strip().splitlines()[-15:]
    lines = [f"`{shlex.join(['pytest', *cmd[3:]])}`" + ("" if cuda else " (no CUDA: the CUDA tests skip)"),
             "", "```", *tail, "```"]
    return lines, r.returncode == 0


EXTRA = {"wgsef": ("regularizer.finish_epoch=0",)}  # top-k at once: section 6 measures a really compacted model


def _presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml") if p.stem != "ssl_from_dense")


@section("2. One epoch of every method on synthetic CIFAR-10-format data")
def one_epoch_runs(sizes: Sizes, out: dict):
    from wgsef.run import run

    rows, ok = [], True
    for method in _presets():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = bench_step.compose(
                f"method={method}", *EXTRA.get(method, ()), "dataset=cifar10", f"dataset.synthetic={sizes.run_images}", *sizes.run_model,
                f"trainer.batch_size={sizes.run_batch}", "trainer.epochs=1", "trainer.progress=false",
                f"measure.batches={sizes.latency_batches}", f"measure.min_run_time={sizes.min_run_time}",
                "measure.repeats=1", "measure.clock=wall", f"measure.threads={sizes.cpu_threads}")
            t0 = time.perf_counter()
            try:
                summary = run(cfg, tmp, method)
            except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
                summary = {"status": f"error: {type(e).__name__}: {str(e).strip().splitlines()[:1]}"}
            took = time.perf_counter() - t0
        ok &= summary["status"] == "completed"
        out[method] = summary
        final = summary.get("final", {})
        rows.append(f"| {method} | {summary['status']} | {took:.1f} | {final.get('train_loss', float('nan')):.3f} "
                    f"| {summary.get('compaction', '-')} | {summary.get('device', '-')} |")
    return ["| method | status | seconds | train loss | compaction | device |", "|---|---|---|---|---|---|",
            *rows], ok


@section("3. Per training step, each method against dense")
def step_table(sizes: Sizes, device: torch.device, out: dict, deadline: float):
    rows = bench_step.bench_steps(sizes.step_models, list(bench_step.METHODS), sizes.step_precisions,
                                  batch=sizes.step_batch, steps=sizes.step_steps, width=sizes.step_width,
                                  device=device, clock="wall", deadline=deadline)
    expected = len(sizes.step_models) * len(sizes.step_precisions) * len(bench_step.METHODS)
    out["steps"] = rows
    pipeline = bench_step.bench_pipeline(1280, 128)
    md = bench_step.markdown("scripts/bench/bench_step.py via gpu_check", rows, pipeline).splitlines()[2:]
    syncs_ok = all(r["syncs_amortised"] <= 1 for r in rows)
    resnet = [r for r in rows if r["model"] == "resnet18"]
    slow = [f"{r['precision']} {r['method']} {r['x_dense']:.2f}x" for r in resnet if r["x_dense"] > 1.10]
    speed = "not measured" if not resnet else "met" if not slow else "NOT met (" + ", ".join(slow) + ")"
    verdict = [f"Targets: host syncs per step (amortised) <= 1 for every method: {'met' if syncs_ok else 'NOT met'}; "
               f"each regularizer's step <= 1.10x dense at ResNet18 batch {sizes.step_batch}: {speed}."]
    if len(rows) < expected:
        verdict.append(f"Only {len(rows)} of {expected} rows: the time budget (--budget) ran out.")
    return [*md, "", *verdict], len(rows) == expected


@section("4. WGSEF prox against torch.sort")
def prox(sizes: Sizes, device: torch.device):
    run = bench_prox.timer(device.type, "wall")
    a, k = bench_prox.magnitudes(sizes.prox_n, device.type), max(1, int(bench_prox.KEEP * sizes.prox_n))
    fns = {name: (lambda fn=fn: fn(a, k)) for name, fn in bench_prox.METHODS.items()}
    times = bench_prox.interleaved(fns, 5, run)
    lines = [f"{sizes.prox_n:,} magnitudes on {device}, k = n/10, median of 5:", "",
             "| method | ms | / torch.sort |", "|---|---|---|"]
    lines += [f"| {name} | {t * 1e3:.2f} | {t / times['torch_sort']:.2f} |" for name, t in times.items()]
    best = min(times["wgsef_linear"], times["wgsef_vectorised"]) / times["torch_sort"]
    lines += ["", f"Target (a): WGSEF prox / torch.sort <= 0.25: {best:.2f} ({'met' if best <= 0.25 else 'NOT met'})."]
    return lines, True


@section("5. 2:4 semi-structured Linear against dense")
def nm(sizes: Sizes, cuda: bool):
    if not cuda or not sizes.nm_sizes:
        from wgsef.regularizers.srste import CPU_MESSAGE

        return [f"skipped: no CUDA GPU ({CPU_MESSAGE})."], True
    rows = [bench_nm.bench(size, torch.float16, sizes.min_run_time) for size in sizes.nm_sizes]
    lines = ["fp16, batch x in x out:", "", "| size | dense ms | 2:4 ms | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['size']} | skipped: {r['skipped']} | | |" if "skipped" in r else
              f"| {r['size']} | {r['dense_ms']:.4f} | {r['semi_structured_ms']:.4f} | {r['speedup']:.2f} |" for r in rows]
    return lines, True


@section("6. Latency of a compacted model")
def compact_latency(runs: dict):
    summary = runs.get("wgsef", {})
    keys = {k: v for k, v in summary.items() if k.startswith(("latency_ms_", "speedup_")) or k in
            ("compaction", "removed_channels", "params_reduction", "flops_reduction")}
    if not keys:
        return ["the WGSEF run of section 2 has no measurement"], False
    lines = ["The WGSEF one-epoch run of section 2 (dense vs compacted, median latency, wall clock):", "",
             "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in keys.items()]
    return lines, any(k.startswith("latency_ms_cuda") for k in keys) or not torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (also the default without CUDA)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.md")
    p.add_argument("--budget", type=float, default=360,
                   help="seconds from the start after which the step table stops adding rows (the rest is short)")
    args = p.parse_args(argv)
    command = "python scripts/bench/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device, sizes = torch.device("cuda" if cuda else "cpu"), GPU if cuda else CPU
    if not cuda:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs, steps = {}, {}
    parts = [cuda_tests(cuda), one_epoch_runs(sizes, runs), step_table(sizes, device, steps, t0 + args.budget), prox(sizes, device),
             nm(sizes, cuda), compact_latency(runs)]
    name = torch.cuda.get_device_name() if cuda else "CPU (tiny sizes: a check of the script, not of a GPU)"
    head = [command, "", f"# GPU check: {name}", "",
            f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s in all; "
            f"{sum(ok for _, ok in parts)}/{len(parts)} sections ok.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + [line for lines, _ in parts for line in lines]))
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "steps": steps.get("steps", [])},
                                                        indent=1, default=str))
    print(f"wrote {args.out}")
    return 0 if all(ok for _, ok in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
