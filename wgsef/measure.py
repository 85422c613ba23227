"""Parameters, FLOPs, sparsity and latency, counted from the model itself (never from mask flags).

FLOPs convention: FLOPs = 2 * MACs of conv / linear / matmul ops, exactly as torch's FlopCounterMode
counts them (BN, activations, pooling and additions are not counted). `flops_reduction` and
`params_reduction` are factors dense / compact (2.0 means half the work), `speedup_*` is latency
dense / compact. Latency keys name the runtime: `cpu_b64` / `cuda_b64` is PyTorch eager, `ort_cpu_b64` is
the same models exported to ONNX and run by onnxruntime on the CPU (wgsef.deploy).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from wgsef.errors import first_line


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode, restoring each one's own training flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs (= 2 * MACs) of one forward pass on `example_input`, in eval mode, without gradients."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input)
    return int(counter.get_total_flops())


def sparse_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs (2 * MACs) per sample of the conv and linear layers counting only their nonzero weights: what
    a kernel that skips zeros (N:M sparse tensor cores, unstructured sparse kernels) could save at best.
    Other ops are not counted, as in count_flops."""
    total = 0.0

    def hook(m: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total  # each output position takes one MAC per nonzero weight of every filter
        total += 2 * out[0].numel() / m.weight.shape[0] * int((m.weight != 0).sum())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return int(round(total))


def sparsity(model: nn.Module) -> float:
    """Parameter sparsity: the fraction of exact zeros over all parameters."""
    total = count_params(model)
    if total == 0:
        raise ValueError("sparsity of a model without parameters is undefined")
    return sum(int((p == 0).sum()) for p in model.parameters()) / total


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _check_timing(device_type: str, threads: int, min_run_time: float, warmup: int, clock: str) -> None:
    if min_run_time <= 0 or warmup < 0:
        raise ValueError(f"min_run_time must be > 0 and warmup >= 0, got {min_run_time}, {warmup}")
    if clock not in CLOCKS or (clock == "cpu" and (device_type != "cpu" or threads != 1)):
        raise ValueError(f"clock must be 'wall', or 'cpu' with device cpu and threads=1; got {clock!r}, "
                         f"{device_type}, threads={threads}")


def latency_ms(model: nn.Module, example_input: torch.Tensor, device: str | torch.device,
               threads: int | None = None, min_run_time: float = 0.5, warmup: int = 3,
               clock: str = "wall", channels_last: bool = False) -> float:
    """Median latency in ms of one eval-mode, no-grad forward pass on `device`.

    Runs on a copy of the model; `warmup` untimed passes, then torch.utils.benchmark's blocked_autorange
    for at least `min_run_time` seconds (which synchronises CUDA around each block). `threads` fixes
    torch's intra-op thread count for the measurement (default: the current torch.get_num_threads()).
    clock="cpu" times with the calling thread's CPU time instead of wall time: on a shared, oversubscribed
    machine it leaves out the time the process waits for a core; it needs device cpu and threads=1.
    channels_last converts model and input to NHWC first.
    """
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("latency on cuda was requested but CUDA is not available")
    _check_timing(device.type, threads, min_run_time, warmup, clock)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(device, memory_format=memory_format).eval()
    x = example_input.to(device, memory_format=memory_format)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads,
                            timer=CLOCKS[clock])
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def ort_latency_ms(sess, example_input: torch.Tensor, min_run_time: float = 0.5, warmup: int = 3,
                   clock: str = "wall") -> float:
    """Median latency in ms of one run of an onnxruntime session (wgsef.deploy.session) on example_input,
    timed like latency_ms; clock="cpu" needs a session with 1 thread (which runs on the calling thread)."""
    threads = sess.get_session_options().intra_op_num_threads
    _check_timing("cpu", threads, min_run_time, warmup, clock)
    feed = {sess.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    timer = benchmark.Timer(stmt="sess.run(None, feed)", globals={"sess": sess, "feed": feed}, timer=CLOCKS[clock])
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _ort_sessions(models: dict, example_input: torch.Tensor, threads: int) -> tuple[dict, str]:
    """{tag: onnxruntime session} of each model exported to ONNX and checked against PyTorch, or ({}, why
    not) in one line."""
    from wgsef.deploy import checked_session

    try:
        return {tag: checked_session(m, example_input, threads)[0] for tag, m in models.items()}, "done"
    except Exception as e:  # a method's own layers that the exporter cannot trace
        return {}, f"skipped ({type(e).__name__}: {first_line(e)})"


def measure_model(model_dense: nn.Module, model_compact: nn.Module, image_shape, devices=None,
                  batches=(1, 64), threads: int | None = None, min_run_time: float = 0.5,
                  repeats: int = 1, clock: str = "wall", channels_last: bool = False,
                  onnxruntime: bool = False) -> dict:
    """Flat dict comparing a dense model with its compacted copy (see the module docstring for units).

    image_shape is (C, H, W); devices defaults to CPU plus CUDA when available. Each latency is the
    median over `repeats` measurements taken alternately dense / compact, so that a drifting machine
    load biases neither side. Time spent is about 2 * repeats * min_run_time per device and batch.
    clock and channels_last are passed to latency_ms and recorded in the dict. onnxruntime=True also
    times both models exported to ONNX in onnxruntime on the CPU (keys `*_ort_cpu_b<batch>*`, measured in
    the same alternation); `onnxruntime_latency` says "done" or, in one line, why it was skipped.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (channels, height, width), got {tuple(image_shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    devices = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    threads = threads or torch.get_num_threads()
    one = torch.randn(1, *image_shape)
    out = {"params_dense": count_params(model_dense), "params_compact": count_params(model_compact),
           "flops_dense": count_flops(model_dense, one), "flops_compact": count_flops(model_compact, one)}
    out["params_reduction"] = out["params_dense"] / out["params_compact"]
    out["flops_reduction"] = out["flops_dense"] / out["flops_compact"]
    models = {"dense": model_dense, "compact": model_compact}
    sessions = {}
    if onnxruntime:
        sessions, out["onnxruntime_latency"] = _ort_sessions(models, one, threads)
    for device in devices:
        device_type = torch.device(device).type
        for b in batches:
            x = torch.randn(b, *image_shape)
            timers = {f"{device_type}_b{b}": lambda tag: latency_ms(models[tag], x, device, threads, min_run_time,
                                                                     clock=clock, channels_last=channels_last)}
            if sessions and device_type == "cpu":
                timers[f"ort_cpu_b{b}"] = lambda tag: ort_latency_ms(sessions[tag], x, min_run_time, clock=clock)
            times = {(key, tag): [] for key in timers for tag in models}
            for _ in range(repeats):
                for key, timer in timers.items():
                    for tag in models:
                        times[key, tag].append(timer(tag))
            for (key, tag), values in times.items():
                out[f"latency_ms_{key}_{tag}"] = statistics.median(values)
            for key in timers:
                out[f"speedup_{key}"] = out[f"latency_ms_{key}_dense"] / out[f"latency_ms_{key}_compact"]
    out.update(threads=threads, clock=clock, channels_last=channels_last)
    return out
