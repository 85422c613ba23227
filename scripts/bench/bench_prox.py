"""Prox scaling benchmark: time vs number of group variables n (unstructured: one group per weight).

    python scripts/bench/bench_prox.py [--sizes 1e3 1e4 1e5 1e6 1e7 1e8] [--threads N] [--clock wall|cpu]
        [--device cpu|cuda] [--out results/prox_scaling]

Times, as the median of repeats on the magnitudes of a Gaussian vector with k = n / 10 and mu = 1e-3:
the linear-time WGSEF prox, the vectorised (sort-based) WGSEF prox, torch.sort of the same magnitudes
(the reference), and the group-lasso prox. Then the targets, measured in the same run:
  (a) WGSEF prox on 11.2M values (ResNet18's weights) / torch.sort of them    target <= 0.25
  (b) linear WGSEF prox time per variable at 1e7 / at 1e5                      target <= 2
  (c) one filter-group prox step on ResNet18 (norms, prox, rescale), WGSEF / group lasso   target <= 2
Writes <out>.csv (first line: a comment with the command) and <out dir>/figures/<name>.{png,pdf}.
"""
import argparse
import csv
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from wgsef.functional import group_lasso_prox, wgsef_prox

RESNET18_PARAMS = 11_200_000
MU, KEEP = 1e-3, 0.1
METHODS = {  # name -> function of (a, k)
    "wgsef_linear": lambda a, k: wgsef_prox(a, k, MU, method="linear"),
    "wgsef_vectorised": lambda a, k: wgsef_prox(a, k, MU, method="vectorised"),
    "torch_sort": lambda a, k: torch.sort(a),
    "group_lasso": lambda a, k: group_lasso_prox(a, MU),
}
# peak memory per variable (bytes, float32 input) and a size above which a method is too slow to repeat
BYTES_PER_VAR = {"wgsef_linear": 20, "wgsef_vectorised": 100, "torch_sort": 16, "group_lasso": 12}
MAX_N = {"wgsef_vectorised": 3 * 10**7}


def timer(device: str, clock: str):
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = now()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return now() - start
    return run


def repeats_for(n: int) -> int:
    return 7 if n <= 10**6 else 3 if n <= 2 * 10**7 else 2


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def magnitudes(n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g).abs_().to(device)


def interleaved(fns: dict, repeats: int, run, reset=lambda: None) -> dict:
    """Median time of each function, calling them in turn so load changes hit all of them alike;
    `reset` runs untimed before every call."""
    for fn in fns.values():
        reset()
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            reset()
            times[name].append(run(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def scaling(sizes: list[int], device: str, run) -> list[dict]:
    rows = []
    for n in sizes:
        a, k = magnitudes(n, device), max(1, int(KEEP * n))
        fns = {}
        for name, fn in METHODS.items():
            need = BYTES_PER_VAR[name] * n
            if n > MAX_N.get(name, n) or (device == "cpu" and need > 0.8 * available_bytes()):
                print(f"  skip {name} at n={n:.0e}: needs ~{need / 2**30:.1f} GiB and minutes per call")
                continue
            fns[name] = lambda fn=fn: fn(a, k)
        for name, t in interleaved(fns, repeats_for(n), run).items():
            rows.append({"n": n, "method": name, "seconds": t, "ns_per_var": 1e9 * t / n})
            print(f"  n={n:>11,d} {name:<17} {t * 1e3:10.2f} ms  {1e9 * t / n:7.2f} ns/var")
        del a
    return rows


def resnet18_filter_step(device: str, run, repeats: int = 7) -> dict:
    """One prox step over ResNet18's filter groups (norms, prox on the norms, rescale in place), and the
    prox on the norm vector alone."""
    from wgsef.groups import build_groups
    from wgsef.models import build

    model = build("resnet18", num_classes=10, in_channels=3, image_size=32).to(device)
    groups = build_groups(model, "filter", torch.randn(1, 3, 32, 32, device=device))
    sizes = groups.sizes.to(device)
    d, w, k = sizes / sizes.mean(), sizes.sqrt(), len(groups) // 2
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}

    def step(prox):
        def fn():
            a = groups.norms()
            groups.scale_(torch.where(a > 0, prox(a) / a, 0))
        return fn

    proxes = {"wgsef": lambda a: wgsef_prox(a, k, MU, d), "group_lasso": lambda a: group_lasso_prox(a, MU, w)}
    steps = interleaved({name: step(prox) for name, prox in proxes.items()}, repeats, run,
                        reset=lambda: model.load_state_dict(original))  # the same weights every call
    a = groups.norms()
    on_norms = interleaved({name: lambda prox=prox: prox(a) for name, prox in proxes.items()}, repeats, run)
    return {"groups": len(groups), "step": steps, "norms_only": on_norms}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in METHODS:
        pts = sorted((r["n"], r["seconds"]) for r in rows if r["method"] == name)
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=name.replace("_", " "))
    ax.set_xlabel("number of group variables n")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Prox time vs n (k = n/10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{ext}"))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6, 1e7, 1e8])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process time (use with 1 thread)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="results/prox_scaling")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = timer(args.device, args.clock)
    print(f"device={args.device} threads={torch.get_num_threads()} clock={args.clock}")

    rows = scaling([int(n) for n in args.sizes], args.device, run)
    a = magnitudes(RESNET18_PARAMS, args.device)
    k = int(KEEP * RESNET18_PARAMS)
    t = interleaved({"prox": lambda: wgsef_prox(a, k, MU), "sort": lambda: torch.sort(a)}, 3, run)
    del a
    rows.append({"n": RESNET18_PARAMS, "method": "wgsef_auto", "seconds": t["prox"],
                 "ns_per_var": 1e9 * t["prox"] / RESNET18_PARAMS})
    rows.append({"n": RESNET18_PARAMS, "method": "torch_sort", "seconds": t["sort"],
                 "ns_per_var": 1e9 * t["sort"] / RESNET18_PARAMS})
    per_var = {r["n"]: r["ns_per_var"] for r in rows if r["method"] == "wgsef_linear"}
    resnet = resnet18_filter_step(args.device, run)
    for part in ("step", "norms_only"):
        for name, sec in resnet[part].items():
            rows.append({"n": resnet["groups"], "method": f"resnet18_filter_{part}_{name}", "seconds": sec,
                         "ns_per_var": 1e9 * sec / resnet["groups"]})

    header = (f"python {shlex.join(['scripts/bench/bench_prox.py', *argv])}  "
              f"(device={args.device}, threads={torch.get_num_threads()}, clock={args.clock})")
    out = Path(args.out).with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=["n", "method", "seconds", "ns_per_var"])
        writer.writeheader()
        writer.writerows(rows)
    figure = out.parent / "figures" / out.stem
    plot(rows, figure)

    step, alone = resnet["step"], resnet["norms_only"]
    targets = [f"(a) WGSEF prox / torch.sort on {RESNET18_PARAMS:,} values: "
               f"{t['prox']:.3f} s / {t['sort']:.3f} s = {t['prox'] / t['sort']:.3f}   (target <= 0.25)"]
    if 10**7 in per_var and 10**5 in per_var:
        targets.append(f"(b) linear prox time per variable, 1e7 / 1e5: {per_var[10**7]:.2f} / "
                       f"{per_var[10**5]:.2f} ns = {per_var[10**7] / per_var[10**5]:.2f}   (target <= 2)")
    targets.append(f"(c) ResNet18 filter-group prox step ({resnet['groups']} groups), WGSEF / group lasso: "
                   f"{step['wgsef'] * 1e3:.2f} / {step['group_lasso'] * 1e3:.2f} ms = "
                   f"{step['wgsef'] / step['group_lasso']:.2f}   (target <= 2); on the norm vector alone: "
                   f"{alone['wgsef'] * 1e3:.3f} / {alone['group_lasso'] * 1e3:.3f} ms")
    print("\n".join(targets))
    out.with_suffix(".md").write_text(f"<!-- {header} -->\n\nTargets, measured in one run:\n\n"
                                      + "".join(f"- {line}\n" for line in targets))
    print(f"wrote {out}, {out.with_suffix('.md')} and {figure}.png/.pdf")


if __name__ == "__main__":
    main(sys.argv[1:])
