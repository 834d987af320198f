"""benchmarks/bench_ops.py: convolutions classified by kind from their weights, and a table whose
figures come from the profiler's events of a real pass."""

from __future__ import annotations

import torch

from conftest import load_benchmark


def test_kinds_follow_the_weight_shapes_of_mobilenet_v2():
    bench = load_benchmark("bench_ops")
    from protopnet.model.backbones import build_backbone

    convs = [m for m in build_backbone("mobilenet_v2", pretrained=False).module.modules() if isinstance(m, torch.nn.Conv2d)]
    kinds = [bench.kind_of(list(m.weight.shape)) for m in convs]
    for conv, kind in zip(convs, kinds):
        if conv.kernel_size == (1, 1):
            assert kind == "pointwise"
        elif conv.groups == conv.in_channels == conv.out_channels:
            assert kind == "depthwise"
        else:
            assert kind == "spatial"
    assert set(kinds) == {"depthwise", "pointwise", "spatial"}


def test_each_kind_s_time_is_measured_in_every_arithmetic(capsys):
    bench = load_benchmark("bench_ops")
    from protopnet.model.backbones import build_backbone

    features = build_backbone("mobilenet_v2", pretrained=False).module
    figures = bench.measure(features, torch.randn(2, 3, 32, 32), channels_last=True, bf16=False, repeats=1)
    for kind in bench.KINDS:
        assert figures[f"{kind} forward"] > 0 and figures[f"{kind} backward"] > 0, kind
    assert figures["pass"] >= figures["depthwise forward"]
    bench.main(["--backbones", "tiny_cnn", "--size", "32", "--batch", "2", "--threads", "1", "--repeats", "1"])
    table = capsys.readouterr().out
    assert "| tiny_cnn | spatial |" in table and "| tiny_cnn | whole forward + backward (wall) |" in table
