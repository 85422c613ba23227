"""Measure params, FLOPs and latency of a checkpoint, dense vs compact.

    python scripts/bench/bench_latency.py --compact results/model_compact.pt [--out m.json]
        (a save_compact file; its dense counterpart is the same architecture built at full width)
    python scripts/bench/bench_latency.py --model vgg16 --state-dict ckpt.pt --in-channels 3 --image-size 32
        (a dense state_dict; it is compacted here with wgsef.compress.compact)

Prints the wgsef.measure.measure_model dict as JSON and optionally writes it to --out.
"""
import argparse
import json
from pathlib import Path

import torch

from wgsef.compress import compact, load_arch, load_compact
from wgsef.measure import measure_model
from wgsef.models import MODELS, build


def load_state_dict(path: Path) -> dict:
    """A bare state_dict, or one stored under 'state_dict' / 'model' in a checkpoint dict."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            return blob[key]
    return blob


def models_from_args(args) -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, int, int]]:
    if args.compact is not None:
        arch = load_arch(args.compact)
        dense = build(**arch)
        return dense, load_compact(args.compact), (arch["in_channels"], arch["image_size"], arch["image_size"])
    if args.model is None or args.state_dict is None:
        raise SystemExit("give either --compact PATH or both --model NAME and --state-dict PATH")
    kwargs = {} if args.width is None else {"width": args.width}
    dense = build(args.model, args.num_classes, args.in_channels, args.image_size, **kwargs)
    dense.load_state_dict(load_state_dict(args.state_dict))
    shape = (args.in_channels, args.image_size, args.image_size)
    return dense, compact(dense.eval(), torch.randn(1, *shape)), shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compact", type=Path, help="a file written by wgsef.compress.save_compact")
    parser.add_argument("--model", choices=list(MODELS))
    parser.add_argument("--state-dict", type=Path)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=float)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: thread CPU time (needs --threads 1), robust on a shared machine")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", type=Path, help="write the dict here as JSON")
    args = parser.parse_args(argv)
    dense, small, shape = models_from_args(args)
    result = measure_model(dense, small, shape, devices=args.devices, batches=tuple(args.batches),
                           threads=args.threads, min_run_time=args.min_run_time, repeats=args.repeats,
                           clock=args.clock, channels_last=args.channels_last)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
