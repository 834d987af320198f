"""Ensembles (paper Section 2.5): summed logits, concatenated prototype facts, a combined score
sheet that adds up to the logits, members of different input sizes, safe saving and loading."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet import CheckpointError, ProtoPNet, explain, load_model, save_model
from protopnet.data.base import ProtoDataset
from protopnet.ensemble import Ensemble, save_ensemble
from protopnet.train.evaluate import evaluate

NAMES = ["wren", "finch", "crow"]


def member(seed: int, per_class: int = 2, image_size: int = 32, backbone: str = "tiny_cnn", names=NAMES, dim: int = 8) -> ProtoPNet:
    torch.manual_seed(seed)
    model = ProtoPNet(backbone=backbone, pretrained=False, num_classes=len(names), prototypes_per_class=per_class, prototype_dim=dim, class_names=names)
    with torch.no_grad():  # distinct, non-default last layers so sums are informative
        model.last_layer.weight.add_(0.3 * torch.randn_like(model.last_layer.weight))
    model.image_size = image_size
    return model.eval()


class NoiseDataset(ProtoDataset):
    def __init__(self, n: int = 6, size: int = 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> None:
        super().__init__(image_size=size, mean=mean, std=std)
        self.classes, self.targets = list(NAMES), [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 255, size=(self.image_size, self.image_size, 3), dtype=np.uint8))


def test_same_preprocessing_members_sum_exactly():
    a, b = member(0, per_class=2), member(1, per_class=3, dim=4)
    ensemble = Ensemble([a, b]).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, oa, ob = ensemble(x), a(x), b(x)
    assert torch.equal(out.logits, oa.logits + ob.logits)
    assert torch.equal(out.similarities, torch.cat([oa.similarities, ob.similarities], 1))
    assert torch.equal(out.min_distances, torch.cat([oa.min_distances, ob.min_distances], 1))
    assert [d.shape for d in out.distances] == [oa.distances.shape, ob.distances.shape]
    assert ensemble.num_prototypes == 15 and out.similarities.shape == (4, 15)
    assert ensemble.prototype_member.tolist() == [0] * 6 + [1] * 9
    assert ensemble.prototype_local_index.tolist() == list(range(6)) + list(range(9))
    assert torch.equal(ensemble.prototype_classes, torch.cat([a.prototype_classes, b.prototype_classes]))
    weight = ensemble.last_layer_weight
    assert weight.shape == (3, 15)
    assert torch.equal(weight[:, 6:], b.last_layer.weight.detach())
    assert torch.allclose(out.similarities @ weight.t(), out.logits, atol=1e-5)
    assert ensemble.member_offsets() == [0, 6]


def test_the_explanation_of_an_ensemble_adds_up_to_its_logits():
    ensemble = Ensemble([member(0), member(1, per_class=1, image_size=48)]).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        logits = ensemble(x).logits
    for b in range(2):
        e = explain(ensemble, x[b], top_classes=3)  # one image without a batch axis
        assert len(e.matches) == 9 and len(e.classes) == 3
        for sheet in e.classes:
            assert math.fsum(row.points for row in sheet.rows) == pytest.approx(float(logits[b, sheet.class_index]), abs=1e-5)
            # the points are similarity x weight of each row
            assert all(row.points == pytest.approx(row.similarity * row.weight, rel=1e-6, abs=1e-7) for row in sheet.rows)
        matches = sorted(e.matches, key=lambda m: (m.member, m.prototype))
        assert [m.member for m in matches] == [0] * 6 + [1] * 3
        assert [m.prototype for m in matches] == list(range(6)) + list(range(3))
        assert all(m.class_name == NAMES[m.class_index] for m in matches)


def test_members_with_other_sizes_and_normalisation_see_their_own_input():
    a = member(0, image_size=32)
    b = member(1, image_size=48)
    b.mean, b.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ensemble = Ensemble([a, b]).eval()
    assert ensemble.image_size == 48 and ensemble.mean == tuple(a.mean)
    x = torch.randn(2, 3, 48, 48)
    xa, xb = ensemble.member_input(x, 0), ensemble.member_input(x, 1)
    assert xa.shape == (2, 3, 32, 32) and xb.shape == (2, 3, 48, 48)
    raw = x * 0.25 + 0.5
    assert torch.allclose(xb, (raw - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1), atol=1e-5)
    # a constant picture stays the same constant after resizing
    flat = torch.full((1, 3, 48, 48), 0.7)
    assert torch.allclose(ensemble.member_input(flat, 0), torch.full((1, 3, 32, 32), 0.7), atol=1e-5)
    with torch.no_grad():
        out = ensemble(x)
        assert torch.allclose(out.logits, a(xa).logits + b(xb).logits, atol=1e-5)
    assert out.distances[0].shape[-1] == 4 and out.distances[1].shape[-1] == 6


@pytest.mark.parametrize("target", [20, 32, 64])
def test_resize_matrix_is_antialiased_bilinear(target):
    import torch.nn.functional as F

    from protopnet.ensemble import resize_matrix

    x = torch.rand(2, 3, 48, 48)
    r = resize_matrix(48, target)
    expected = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(r @ x @ r.t(), expected, atol=1e-5)
    assert torch.allclose(r.sum(dim=1), torch.ones(target), atol=1e-6)  # rows are weights summing to 1


def test_members_must_share_classes():
    with pytest.raises(ValueError, match="member 1 has 4 classes but member 0 has 3"):
        Ensemble([member(0), member(1, names=NAMES + ["gull"])])
    with pytest.raises(ValueError, match=r"member 1 names its classes differently.*class 2: 'raven' vs 'crow'"):
        Ensemble([member(0), member(1, names=["wren", "finch", "raven"])])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_nested_ensembles_are_flattened():
    a, b, c = member(0), member(1), member(2)
    ensemble = Ensemble([Ensemble([a, b]), c])
    assert ensemble.num_members == 3 and ensemble.members[2] is c


def test_save_load_round_trip_and_evaluate(tmp_path):
    data = NoiseDataset(n=6, size=48)
    a, b = member(0, image_size=32), member(1, per_class=1, image_size=48)
    a_dir = save_model(a, tmp_path / "a")
    (a_dir / "config.yaml").write_text("seed: 7\n")
    a = load_model(a_dir)
    ensemble = Ensemble([a, b]).eval()
    path = save_ensemble(ensemble, tmp_path / "ens")
    meta = json.loads((path / "model.json").read_text())
    assert meta["kind"] == "ensemble" and [m["path"] for m in meta["members"]] == ["members/0", "members/1"]
    assert (path / "members" / "0" / "model.safetensors").is_file()
    assert (path / "members" / "0" / "config.yaml").read_text() == "seed: 7\n"
    assert a.source_directory == str(path / "members" / "0")
    loaded = load_model(path)
    assert isinstance(loaded, Ensemble) and loaded.num_members == 2 and loaded.image_size == 48
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ensemble(x).logits)
    result = evaluate(loaded, data)
    assert result["n"] == 6
    with torch.no_grad():
        expected = (ensemble(torch.stack([data[i][0] for i in range(6)])).logits.argmax(1) == torch.tensor(data.targets)).float().mean()
    assert result["accuracy"] == pytest.approx(float(expected))


@pytest.mark.parametrize("bad", ["../a", "/etc", ".", "members/9"])
def test_loading_refuses_member_paths_outside_or_missing(tmp_path, bad):
    save_model(member(0), tmp_path / "a")
    path = save_ensemble(Ensemble([member(0), member(1)]), tmp_path / "ens")
    meta = json.loads((path / "model.json").read_text())
    meta["members"][1]["path"] = bad
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="member|outside|relative"):
        load_model(path)


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("members", [], "non-empty 'members'"),
        ("members", [7], "relative"),
        ("image", "big", "'image' must be an object"),
        ("image", {"size": 10**9}, "image size"),
        ("image", {"mean": [0.5]}, "mean and std"),
        ("history", "x", "'history'"),
        ("class_names", ["x", "y", "z"], "class_names do not match"),
    ],
)
def test_loading_refuses_hostile_model_json(tmp_path, key, value, pattern):
    path = save_ensemble(Ensemble([member(0), member(1)]), tmp_path / "ens")
    meta = json.loads((path / "model.json").read_text())
    meta[key] = value
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=pattern):
        load_model(path)


def test_loading_refuses_tampered_member_tensors(tmp_path):
    path = save_ensemble(Ensemble([member(0), member(1)]), tmp_path / "ens")
    target = path / "members" / "1" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(path)


def test_cli_ensemble(tmp_path, capsys):
    from protopnet.cli import main

    dirs = [save_model(member(s, image_size=32 + 16 * s), tmp_path / f"m{s}") for s in range(2)]
    assert main(["-q", "ensemble", *map(str, dirs), "--out", str(tmp_path / "ens")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(tmp_path / "ens"), "members": 2, "prototypes": 12, "image_size": 48}
    loaded = load_model(tmp_path / "ens")
    assert isinstance(loaded, Ensemble) and loaded.history[-1]["event"] == "ensemble"
    other = save_model(member(3, names=["a", "b", "c"]), tmp_path / "other")
    assert main(["-q", "ensemble", str(dirs[0]), str(other), "--out", str(tmp_path / "bad")]) == 1
    assert "names its classes differently" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # the evaluate command works on the ensemble directory (data prepared at the ensemble's size)
    data = NoiseDataset(n=6, size=48)
    for i in range(len(data)):
        folder = tmp_path / "data" / "test" / NAMES[data.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        data.load_image(i).save(folder / f"{i}.png")
    code = main(["-q", "evaluate", str(tmp_path / "ens"), "--data", str(tmp_path / "data"), "--json", str(tmp_path / "eval.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 6
    shutil.rmtree(tmp_path / "ens")
