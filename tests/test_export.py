"""Export to ONNX and TorchScript: logits, similarities and distance maps equal PyTorch's
(max abs difference <= 1e-4) on random inputs of several batch sizes; metadata; the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from protopnet import ProtoPNet, save_model
from protopnet.ensemble import Ensemble
from protopnet.export import (
    check_export,
    export_onnx,
    export_torchscript,
    read_onnx_metadata,
    read_torchscript_metadata,
    reference_outputs,
    run_onnx,
    run_torchscript,
)

TOLERANCE = 1e-4


def tiny(seed: int = 0, image_size: int = 32, size=(1, 1), activation: str = "log") -> ProtoPNet:
    torch.manual_seed(seed)
    model = ProtoPNet(backbone="tiny_cnn", pretrained=False, num_classes=3, prototypes_per_class=2, prototype_dim=8,
                      prototype_size=size, activation=activation, class_names=["a", "b", "c"])
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.image_size = image_size
    return model.eval()


@pytest.fixture(scope="module")
def onnx_runtime():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def assert_close(expected, got, names):
    assert len(expected) == len(got) == len(names)
    for name, e, g in zip(names, expected, got):
        assert tuple(e.shape) == tuple(g.shape), name
        assert float((e - g).abs().max()) <= TOLERANCE, f"{name}: max abs diff {float((e - g).abs().max()):.2e}"


@pytest.mark.parametrize("size", [(1, 1), (2, 2)])
def test_onnx_matches_pytorch_for_any_batch(tmp_path, onnx_runtime, size):
    model = tiny(size=size)
    path = export_onnx(model, tmp_path / "model.onnx")
    for batch in (1, 5):  # traced with 2
        x = torch.randn(batch, 3, 32, 32)
        expected = reference_outputs(model, x)
        got = run_onnx(path, x)
        assert_close(expected, got, ["logits", "similarities", "distances"])
        h = 4 - size[0] + 1
        assert got[0].shape == (batch, 3) and got[1].shape == (batch, 6) and got[2].shape == (batch, 6, h, h)
    # the outputs are the real ones: logits = similarities @ W.T, similarities = log-activation of min distances
    d = got[2].flatten(2).amin(2)
    assert torch.allclose(got[1], torch.log((d + 1) / (d + 1e-4)), atol=1e-4)
    assert torch.allclose(got[0], got[1] @ model.last_layer.weight.detach().t(), atol=1e-4)
    check = check_export(model, path, "onnx", batch_sizes=(1, 3))
    assert set(check.max_abs_diff) == {"logits", "similarities", "distances"}
    assert max(check.max_abs_diff.values()) <= TOLERANCE and check.ok


def test_onnx_metadata_and_io_names(tmp_path, onnx_runtime):
    import onnx

    model = tiny(image_size=32)
    path = export_onnx(model, tmp_path / "m.onnx")
    meta = read_onnx_metadata(path)
    assert int(meta["image_size"]) == 32
    assert json.loads(meta["mean"]) == pytest.approx(list(model.mean)) and json.loads(meta["std"]) == pytest.approx(list(model.std))
    assert json.loads(meta["class_names"]) == ["a", "b", "c"]
    assert json.loads(meta["prototype_classes"]) == [0, 0, 1, 1, 2, 2]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "similarities", "distances"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_torchscript_matches_pytorch_for_any_batch(tmp_path):
    model = tiny(activation="linear", seed=1)
    path = export_torchscript(model, tmp_path / "model.pt")
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        assert_close(reference_outputs(model, x), run_torchscript(path, x), ["logits", "similarities", "distances"])
    facts = read_torchscript_metadata(path)
    assert facts["image_size"] == "32" and json.loads(facts["mean"]) == pytest.approx(list(model.mean))
    check = check_export(model, path, "torchscript")
    assert max(check.max_abs_diff.values()) <= TOLERANCE and check.ok


def test_pushed_model_on_its_own_push_images(tmp_path, onnx_runtime):
    """Pushed prototypes sit at distance ~0 from patches of the push images, where the log
    activation's slope is ~1/epsilon: distances must still agree to 1e-4, and similarities and
    logits within what that distance tolerance allows."""
    from protopnet.data.base import ProtoDataset
    from protopnet.train.push import push_prototypes

    class Noise(ProtoDataset):
        classes, targets = ["a", "b", "c"], [0, 1, 2, 0, 1, 2]

        def __len__(self):
            return 6

        def load_image(self, index):
            from PIL import Image

            rng = torch.Generator().manual_seed(index)
            return Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy())

    data = Noise(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = tiny(seed=2)
    push_prototypes(model, data)
    path = export_onnx(model, tmp_path / "pushed.onnx")
    images = torch.stack([data[i][0] for i in range(6)])
    check = check_export(model, path, "onnx", images=images)
    assert check.ok, check.to_json()
    assert check.max_abs_diff["distances"] <= TOLERANCE
    assert float(reference_outputs(model, images)[2].flatten(2).amin(2).min()) < 1e-3  # really near 0
    # a file of another model fails the check
    other = export_onnx(tiny(seed=9), tmp_path / "other.onnx")
    bad = check_export(model, other, "onnx", images=images)
    assert not bad.ok and bad.worst_ratio["logits"] > 1


def test_ensemble_exports_one_distance_output_per_member(tmp_path, onnx_runtime):
    ensemble = Ensemble([tiny(0, image_size=32), tiny(1, image_size=48)]).eval()
    path = export_onnx(ensemble, tmp_path / "ens.onnx")
    x = torch.randn(3, 3, 48, 48)
    got = run_onnx(path, x)
    assert [tuple(t.shape) for t in got] == [(3, 3), (3, 12), (3, 6, 4, 4), (3, 6, 6, 6)]
    assert_close(reference_outputs(ensemble, x), got, ["logits", "similarities", "distances_0", "distances_1"])
    assert json.loads(read_onnx_metadata(path)["outputs"]) == ["logits", "similarities", "distances_0", "distances_1"]


def test_export_leaves_training_mode_alone(tmp_path):
    model = tiny().train()
    export_torchscript(model, tmp_path / "m.pt")
    assert model.training


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"protopnet\[export\]"):
        export_onnx(tiny(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(tmp_path, capsys, onnx_runtime):
    from protopnet.cli import main

    source = save_model(tiny(), tmp_path / "model")
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        assert main(["-q", "export", str(source), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["format"] == fmt and summary["check"]["ok"]
        assert max(summary["check"]["max_abs_diff"].values()) <= TOLERANCE
        assert (tmp_path / name).stat().st_size == summary["bytes"]
    assert main(["-q", "export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "no such model directory" in capsys.readouterr().err
