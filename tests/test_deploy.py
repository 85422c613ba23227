"""ONNX export of compacted models (wgsef.deploy) against PyTorch, onnxruntime latency in measure_model and
in a digits run's summary.json."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.test_compress import MODELS, inputs, make
from tests.test_experiments import train
from wgsef.compress import compact, zero_random_groups_
from wgsef.deploy import export_checked, session, to_onnx
from wgsef.measure import measure_model, ort_latency_ms


class FFTNet(nn.Module):
    """A layer the ONNX exporter cannot handle (aten::fft_rfft has no ONNX opset-17 export)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.fft.irfft(torch.fft.rfft(x.flatten(1)), n=8))


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_model_exports_and_matches_pytorch(name, tmp_path):
    model, x = make(name), inputs(name)
    zero_random_groups_(model, x[:1], 0.5, torch.Generator().manual_seed(5))
    small = compact(model, x[:1]).eval()
    path = tmp_path / "compact.onnx"
    out = export_checked(small, x[:1], path)
    assert out["onnx"] == "exported" and out["onnx_max_abs_diff"] <= 1e-4 and "onnx_note" not in out
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    # the file is the compacted network: fewer weights than the dense one's export
    size = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    dense_size = sum(int(np.prod(t.dims)) for t in onnx.load_from_string(to_onnx(model, x[:1])).graph.initializer)
    assert size < dense_size
    # checked independently here, at another batch size than the export's (the batch axis is dynamic)
    x5 = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(6))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x5.numpy()})[0]
    with torch.no_grad():
        want = small(x5).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    assert model.training is False and small.training is False  # export worked on copies


def test_zeros_inside_weights_are_noted_as_run_dense(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.view(-1)[::2] = 0  # 2:4-like zeros: no channel can go
    out = export_checked(model, torch.randn(1, 8), tmp_path / "m.onnx")
    assert out["onnx"] == "exported" and "dense (16 zero weights computed)" in out["onnx_note"]


def test_layers_that_do_not_export_are_one_line_and_leave_no_file(tmp_path, capfd):
    path = tmp_path / "m.onnx"
    out = export_checked(FFTNet(), torch.randn(1, 8), path)
    assert out == {"onnx": out["onnx"]} and out["onnx"].startswith("not exported (") and "\n" not in out["onnx"]
    assert "fft" in out["onnx"] and not path.exists()
    assert "graph" not in capfd.readouterr().out  # the exporter's graph dump is kept off stdout


def test_outputs_that_differ_are_not_exported(tmp_path, monkeypatch):
    import wgsef.deploy

    monkeypatch.setattr(wgsef.deploy, "max_abs_diff", lambda *a: 3e-3)
    out = export_checked(nn.Linear(4, 2), torch.randn(1, 4), tmp_path / "m.onnx", atol=1e-4)
    assert out == {"onnx": "not exported (ValueError: onnxruntime differs from PyTorch by 0.003 > 0.0001)"}
    assert not (tmp_path / "m.onnx").exists()


def test_ort_latency_and_session_checks():
    sess = session(to_onnx(nn.Linear(8, 8), torch.randn(1, 8)), threads=1)
    assert 0 < ort_latency_ms(sess, torch.randn(4, 8), min_run_time=0.01, clock="cpu") < 100
    with pytest.raises(ValueError, match="threads=1"):
        ort_latency_ms(session(to_onnx(nn.Linear(8, 8), torch.randn(1, 8)), threads=2), torch.randn(4, 8),
                       min_run_time=0.01, clock="cpu")
    with pytest.raises(ValueError, match="threads"):
        session(b"", threads=0)


def test_measure_model_times_onnxruntime_beside_pytorch():
    dense = make("lenet5")
    x = inputs("lenet5")
    zero_random_groups_(dense, x[:1], 0.5, torch.Generator().manual_seed(0))
    small = compact(dense, x[:1])
    out = measure_model(dense, small, (1, 16, 16), devices=("cpu",), batches=(1, 4), threads=1,
                        min_run_time=0.01, clock="cpu", onnxruntime=True)
    assert out["onnxruntime_latency"] == "done"
    for b in (1, 4):
        for runtime in ("cpu", "ort_cpu"):
            key = f"{runtime}_b{b}"
            assert out[f"latency_ms_{key}_dense"] > 0 and out[f"latency_ms_{key}_compact"] > 0
            ratio = out[f"latency_ms_{key}_dense"] / out[f"latency_ms_{key}_compact"]
            assert out[f"speedup_{key}"] == pytest.approx(ratio)
    skipped = measure_model(FFTNet(), FFTNet(), (1, 2, 4), devices=("cpu",), batches=(1,), threads=1,
                            min_run_time=0.01, clock="cpu", onnxruntime=True)
    assert skipped["onnxruntime_latency"].startswith("skipped (UnsupportedOperatorError")
    assert "speedup_cpu_b1" in skipped and not [k for k in skipped if "ort_cpu" in k]


def test_digits_run_writes_compact_onnx_and_ort_latency(tmp_path, monkeypatch):
    train(monkeypatch, "method=wgsef", "regularizer.k=0.5", "trainer.epochs=2", "trainer.progress=false",
          "+dataset.limit=256", "measure.repeats=1", "measure.min_run_time=0.01", f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compaction"] == "done" and summary["onnx"] == "exported"
    assert summary["onnx_max_abs_diff"] <= 1e-4 and summary["onnxruntime_latency"] == "done"
    for b in (1, 64):
        assert summary[f"latency_ms_ort_cpu_b{b}_compact"] > 0 and summary[f"speedup_ort_cpu_b{b}"] > 0
    assert (tmp_path / "compact.onnx").stat().st_size > 1000
    # exactly the files README's "One run" listing documents (no empty train.log)
    assert {p.name for p in tmp_path.iterdir()} == {".hydra", ".wgsef-run", "config.yaml", "metrics.csv",
                                                    "summary.json", "checkpoints", "compact.pt", "compact.json",
                                                    "compact.onnx"}
