"""Deployment: ONNX export of a (compacted) model, checked against PyTorch, and onnxruntime CPU sessions.

The export uses torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), which needs
only the `onnx` package; the torch.export-based default would also need onnxscript. The batch axis is
dynamic, so one file serves every batch size. ONNX Runtime has no N:M or unstructured-sparse CPU kernels:
zeros inside a weight tensor are computed like any other weight.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from wgsef.errors import first_line

OPSET = 17
INPUT, OUTPUT = "input", "logits"


@contextlib.contextmanager
def _stdout_silenced():
    """torch 2.14's TorchScript exporter always turns its C++ log on, and on a layer it cannot export
    prints the whole graph to file descriptor 1; point that at /dev/null meanwhile (the error is raised)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def to_onnx(model: nn.Module, example_input: torch.Tensor, opset: int = OPSET) -> bytes:
    """The ONNX model (serialized) of `model` in eval mode, traced on `example_input`, batch axis dynamic.
    Raises whatever the exporter raises for layers it cannot export."""
    model = copy.deepcopy(model).cpu().eval()  # a copy: tracing must not touch the caller's modes or stats
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _stdout_silenced():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen, see the docstring
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a bad trace fails checked_session instead
        torch.onnx.export(model, (example_input.cpu(),), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return buffer.getvalue()


def session(onnx_model: bytes | str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with `threads` intra-op threads, sequential execution and no spinning
    worker threads (with 1 thread every op runs on the calling thread, so its CPU-time clock times it)."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {INPUT: x.detach().cpu().numpy()})[0])


def max_abs_diff(sess: ort.InferenceSession, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's (eval-mode) outputs on x."""
    model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        return (run_session(sess, x) - model(x.cpu())).abs().max().item()


def _zero_weights(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def checked_session(model: nn.Module, example_input: torch.Tensor, threads: int = 1, atol: float = 1e-4,
                    check_batch: int = 3, seed: int = 0) -> tuple[ort.InferenceSession, bytes, float]:
    """Export `model`, open it in onnxruntime and compare with PyTorch on a random batch of `check_batch`
    (another size than the example's: the batch axis must really be dynamic). Returns (session, ONNX bytes,
    max abs difference); raises ValueError when the outputs differ by more than `atol`."""
    blob = to_onnx(model, example_input)
    sess = session(blob, threads)
    x = torch.randn(check_batch, *example_input.shape[1:], generator=torch.Generator().manual_seed(seed))
    diff = max_abs_diff(sess, model, x)
    if not diff <= atol:
        raise ValueError(f"onnxruntime differs from PyTorch by {diff:.3g} > {atol:g}")
    return sess, blob, diff


def export_checked(model: nn.Module, example_input: torch.Tensor, path: str | Path, atol: float = 1e-4) -> dict:
    """Export `model` to `path` once checked_session agrees with PyTorch.

    Returns {"onnx": "exported", "onnx_max_abs_diff": d} (plus "onnx_note" when zeros inside weights will
    run dense); a model that does not export, or differs by more than `atol`, gives {"onnx": "not exported
    (<one line>)"} and leaves no file at `path`.
    """
    try:
        _, blob, diff = checked_session(model, example_input, atol=atol)
    except Exception as e:  # the exporter's errors have no common type; report one line, never a traceback
        return {"onnx": f"not exported ({type(e).__name__}: {first_line(e)})"}
    Path(path).write_bytes(blob)
    out = {"onnx": "exported", "onnx_max_abs_diff": diff}
    if zeros := _zero_weights(model):
        out["onnx_note"] = f"ONNX Runtime runs N:M and unstructured zeros dense ({zeros} zero weights computed)"
    return out
