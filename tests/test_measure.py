"""Counting params, FLOPs (= 2 * MACs), sparsity and latency against hand counts."""
import pytest
import torch
from torch import nn

from wgsef.compress import compact, zero_random_groups_
from wgsef.measure import count_flops, count_params, eval_mode, latency_ms, measure_model, sparsity
from wgsef.models import build


@pytest.mark.parametrize("layer, shape, macs", [
    (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10), 2 * 8 * 10 * 10 * 3 * 3 * 3),
    (nn.Conv2d(4, 6, 5, stride=2, bias=False), (1, 4, 11, 11), 6 * 4 * 4 * 4 * 5 * 5),
    (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (1, 4, 8, 8), 4 * 4 * 4 * 9),  # depthwise
    (nn.Linear(20, 7), (4, 20), 4 * 20 * 7),
])
def test_flops_are_twice_the_hand_counted_macs(layer, shape, macs):
    assert count_flops(layer, torch.randn(shape)) == 2 * macs


def test_params_and_sparsity_hand_count():
    layer = nn.Linear(5, 4)  # 20 weights + 4 biases
    with torch.no_grad():
        layer.weight[:2] = 0
        layer.bias[0] = 0
    assert count_params(layer) == 24
    assert sparsity(layer) == pytest.approx(11 / 24)


def test_eval_mode_restores_flags_and_flop_count_keeps_bn_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].train(False)
    stats = model[1].running_mean.clone()
    count_flops(model, torch.randn(2, 3, 8, 8))
    assert model.training and not model[1].training and torch.equal(stats, model[1].running_mean)
    with eval_mode(model):
        assert not model.training
    assert model.training


def test_latency_is_positive_and_restores_threads():
    threads = torch.get_num_threads()
    ms = latency_ms(nn.Linear(8, 8), torch.randn(2, 8), "cpu", threads=1, min_run_time=0.01, warmup=1)
    assert 0 < ms < 100 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="min_run_time"):
        latency_ms(nn.Linear(8, 8), torch.randn(2, 8), "cpu", min_run_time=0)
    with pytest.raises(ValueError, match="threads=1"):
        latency_ms(nn.Linear(8, 8), torch.randn(2, 8), "cpu", threads=2, clock="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_latency_on_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        latency_ms(nn.Linear(8, 8), torch.randn(2, 8), "cuda")


def test_measure_model_reports_every_key_consistently():
    dense = build("lenet5", num_classes=10, in_channels=1, image_size=16).eval()
    x = torch.randn(1, 1, 16, 16)
    zero_random_groups_(dense, x, 0.5, torch.Generator().manual_seed(0))
    small = compact(dense, x)
    out = measure_model(dense, small, (1, 16, 16), devices=("cpu",), batches=(1, 4), threads=1,
                        min_run_time=0.01, clock="cpu", channels_last=True)
    expected = {"params_dense", "params_compact", "flops_dense", "flops_compact", "params_reduction",
                "flops_reduction", "threads", "clock", "channels_last"}
    expected |= {f"latency_ms_cpu_b{b}_{t}" for b in (1, 4) for t in ("dense", "compact")}
    expected |= {"speedup_cpu_b1", "speedup_cpu_b4"}
    assert set(out) == expected and out["threads"] == 1
    assert out["params_compact"] == count_params(small) < out["params_dense"] == count_params(dense)
    assert out["flops_reduction"] == pytest.approx(out["flops_dense"] / out["flops_compact"])
    assert out["flops_reduction"] > 1
    assert out["speedup_cpu_b4"] == pytest.approx(out["latency_ms_cpu_b4_dense"] / out["latency_ms_cpu_b4_compact"])
    with pytest.raises(ValueError, match="image_shape"):
        measure_model(dense, small, (16, 16))


def test_sparse_flops_counts_nonzero_weights_only():
    from wgsef.measure import sparse_flops

    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    lin = nn.Linear(6 * 5 * 5, 3, bias=False)
    model = nn.Sequential(conv, nn.Flatten(), lin)
    x = torch.randn(2, 4, 5, 5)
    assert sparse_flops(model, x) == count_flops(model, x[:1])  # dense: the same as the FLOP counter
    with torch.no_grad():
        conv.weight.view(-1)[::2] = 0  # half of the conv weights (108 of 216)
        lin.weight[0] = 0  # one of three linear rows
    conv_macs = 25 * 108  # 25 output positions x nonzero weights (all filters)
    lin_macs = 2 * 150
    assert sparse_flops(model, x) == 2 * (conv_macs + lin_macs)
