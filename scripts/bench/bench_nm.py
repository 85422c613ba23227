"""Dense vs 2:4 semi-structured nn.Linear latency on CUDA (torch.utils.benchmark, median).

    python scripts/bench/bench_nm.py [--dtype float16|bfloat16] [--sizes 64x4096x4096 ...] [--out nm.json]

Each size is batch x in_features x out_features. The weight is pruned to 2:4 along its inputs (the
same weights feed both layers), converted with wgsef.regularizers.srste.to_semi_structured, and both
outputs are checked to agree before timing. Without a CUDA GPU with sparse tensor cores it prints why
and exits: there N:M is reported as FLOPs only.
"""
import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from wgsef.regularizers.nm import nm_mask
from wgsef.regularizers.srste import CPU_MESSAGE, to_semi_structured

SIZES = ["64x4096x4096", "512x4096x4096", "2048x4096x11008", "2048x11008x4096", "8192x1024x1024"]


def median_ms(layer: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="layer(x)", globals={"layer": layer, "x": x})  # syncs CUDA itself
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@torch.inference_mode()
def bench(size: str, dtype: torch.dtype, min_run_time: float) -> dict:
    batch, d_in, d_out = map(int, size.split("x"))
    dense = nn.Linear(d_in, d_out).to("cuda", dtype)
    dense.weight.mul_(nm_mask(dense.weight, 2, 4))
    sparse = nn.Linear(d_in, d_out).to("cuda", dtype)
    sparse.load_state_dict(dense.state_dict())
    report = to_semi_structured(sparse)
    if not report["converted"]:
        return {"size": size, "skipped": report["skipped"][""]}
    x = torch.randn(batch, d_in, device="cuda", dtype=dtype)
    torch.testing.assert_close(sparse(x), dense(x), rtol=2e-2, atol=2e-2)
    t_dense, t_sparse = median_ms(dense, x, min_run_time), median_ms(sparse, x, min_run_time)
    return {"size": size, "dense_ms": t_dense, "semi_structured_ms": t_sparse, "speedup": t_dense / t_sparse}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="batch x in_features x out_features")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA GPU: {CPU_MESSAGE}.")
        return
    rows = [bench(size, getattr(torch, args.dtype), args.min_run_time) for size in args.sizes]
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  torch {torch.__version__}")
    print(f"{'batch x in x out':>20} {'dense ms':>10} {'2:4 ms':>10} {'speedup':>8}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['size']:>20}  skipped: {row['skipped']}")
        else:
            times = f"{row['dense_ms']:10.4f} {row['semi_structured_ms']:10.4f} {row['speedup']:8.2f}"
            print(f"{row['size']:>20} {times}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                                        "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
