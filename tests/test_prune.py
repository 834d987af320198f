"""Pruning (paper Section 2.6): k-nearest-patch search against brute force, the pruning rule on a
model built by construction, the last-layer re-fit, the saved model and its report, the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import MarkedNoiseDataset, tiny_model, write_folder
from protopnet import ProtoPNet, load_model
from protopnet.data.base import ProtoDataset
from protopnet.edit import save_pruned
from protopnet.prune import find_nearest_patches, prune
from protopnet.train.evaluate import evaluate

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class GridDataset(ProtoDataset):
    """Pictures made of 8 x 8 pixel blocks, each block one colour: item i is ``grids[i]``
    (G x G x 3 uint8) upscaled to 8G pixels."""

    def __init__(self, grids: list[np.ndarray], labels: list[int], classes: list[str]) -> None:
        super().__init__(image_size=8 * grids[0].shape[0], mean=MEAN, std=STD)
        self.grids, self.targets, self.classes = grids, list(labels), classes

    def __len__(self) -> int:
        return len(self.grids)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(np.kron(self.grids[index], np.ones((8, 8, 1), dtype=np.uint8)))

    def path(self, index: int) -> str:
        return f"grid://{index}"


NoiseDataset = functools.partial(MarkedNoiseDataset, mark_row=4)  # the class mark in rows 4-12


def colour_model(classes: list[int]) -> ProtoPNet:
    """A ProtoPNet whose latent map is the picture's mean colour per 8 x 8 block (normalised), so
    a prototype can be planted exactly on a known patch."""
    model = ProtoPNet(backbone="tiny_cnn", pretrained=False, num_classes=3, prototype_dim=3, prototype_classes=classes)
    model.features, model.add_on = nn.AvgPool2d(8), nn.Identity()
    model.mean, model.std, model.image_size = MEAN, STD, 32
    return model.eval()


def latent_colour(rgb) -> torch.Tensor:
    """The latent (3, 1, 1) of a block of colour ``rgb`` (uint8) under :func:`colour_model`."""
    return ((torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1)


GREY, WHITE = (120, 120, 120), (250, 250, 250)
CLASS_COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220)]


def shared_and_unique_data(per_class: int = 4) -> GridDataset:
    """Every picture: grey, one white block (shared by all classes, same place) and one block of
    its class colour (unique to the class, somewhere else). Classes interleaved: 0, 1, 2, 0, ..."""
    grids, labels = [], []
    rng = np.random.default_rng(0)
    for i in range(3 * per_class):
        k = i % 3
        grid = np.full((4, 4, 3), GREY, dtype=np.uint8)
        grid[0, 0] = WHITE
        r, c = rng.integers(1, 4, size=2)
        grid[r, c] = CLASS_COLOURS[k]
        grids.append(grid)
        labels.append(k)
    return GridDataset(grids, labels, ["red", "green", "blue"])


# -- the rule, by construction ------------------------------------------------------------------

def test_prototype_on_shared_patch_is_pruned_and_class_unique_one_stays():
    data = shared_and_unique_data(per_class=4)  # 12 images, 4 per class
    # prototypes: 0 -> red (class 0, unique), 1 -> white (class 1, shared by all), 2 -> blue (class 2, unique)
    model = colour_model([0, 1, 2])
    protos = torch.stack([latent_colour(CLASS_COLOURS[0]), latent_colour(WHITE), latent_colour(CLASS_COLOURS[2])])
    model.set_prototypes(protos, torch.tensor([0, 1, 2]), model.last_layer.weight.detach().clone())
    report = prune(model, data, k=6, threshold=3, refit=False)
    counts = [p["same_class"] for p in report.prototypes]
    # red: its 4 class-0 images at distance 0 come first, then other colours: 4 of 6 are class 0
    assert counts[0] == 4 and counts[2] == 4
    # white: all 12 images at distance 0, ties go to the smallest dataset index: items 0..5 hold
    # two of each class, so only 2 of 6 are class 1
    assert counts[1] == 2
    assert report.removed == [1] and report.kept == [0, 2]
    assert model.num_prototypes == 2 and model.prototype_classes.tolist() == [0, 2]
    nearest_red = report.prototypes[0]["nearest"]
    assert [row["class_index"] for row in nearest_red[:4]] == [0, 0, 0, 0]
    assert all(row["distance"] < 1e-6 for row in nearest_red[:4]) and nearest_red[4]["distance"] > 0.1
    # the nearest patch position is the red block's cell in that image
    for row in nearest_red[:4]:
        r, c = row["position"]
        assert tuple(data.grids[row["dataset_index"]][r, c]) == CLASS_COLOURS[0]
        assert row["box"] == [8.0 * c, 8.0 * r, 8.0 * c + 8, 8.0 * r + 8]


def test_threshold_zero_prunes_nothing_and_threshold_k_prunes_all_but_pure():
    data = shared_and_unique_data(per_class=6)  # 6 images per class: red has 6 of 6
    model = colour_model([0, 1])
    protos = torch.stack([latent_colour(CLASS_COLOURS[0]), latent_colour(WHITE)])
    model.set_prototypes(protos, torch.tensor([0, 1]), model.last_layer.weight.detach().clone())
    assert prune(model, data, k=6, threshold=0, dry_run=True).removed == []
    assert prune(model, data, k=6, threshold=6, dry_run=True).removed == [1]
    assert model.num_prototypes == 2  # dry runs change nothing
    with pytest.raises(ValueError, match="between 0 and k"):
        prune(model, data, k=6, threshold=7)


def test_per_image_counts_one_patch_per_image():
    # one class-0 picture holds four cells of a colour no other picture has; every other picture
    # is plain grey. Per patch, those four cells are the 4 nearest; per image, only one counts.
    odd = (200, 100, 0)
    grids, labels = [], []
    for i in range(9):
        grid = np.full((4, 4, 3), GREY, dtype=np.uint8)
        if i == 1:
            grid[:2, :2] = odd
        grids.append(grid)
        labels.append([1, 0, 2][i % 3])
    data = GridDataset(grids, labels, ["a", "b", "c"])
    assert labels[1] == 0
    model = colour_model([0])
    model.set_prototypes(latent_colour(odd).unsqueeze(0), torch.tensor([0]), torch.ones(3, 1))
    per_patch = prune(model, data, k=6, threshold=3, per_image=False, dry_run=True)
    per_image = prune(model, data, k=6, threshold=3, per_image=True, dry_run=True)
    rows = per_patch.prototypes[0]["nearest"]
    assert [r["dataset_index"] for r in rows[:4]] == [1, 1, 1, 1]
    assert sorted(tuple(r["position"]) for r in rows[:4]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert per_patch.prototypes[0]["same_class"] >= 4 and per_patch.removed == []
    image_rows = per_image.prototypes[0]["nearest"]
    assert len({r["dataset_index"] for r in image_rows}) == 6  # six different pictures
    assert image_rows[0]["dataset_index"] == 1
    assert per_image.prototypes[0]["same_class"] < 3 and per_image.removed == [0]


# -- the search against brute force -----------------------------------------------------------

def brute_force(model: ProtoPNet, data: ProtoDataset, k: int, per_image: bool):
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor(data.targets)
    with torch.no_grad():
        d = model.distances(model.latent(images))  # (N, M, H', W')
    n, m, hp, wp = d.shape
    out_d, out_i, out_p = [], [], []
    for j in range(m):
        cands = []
        for i in range(n):
            cells = d[i, j].flatten()
            if per_image:
                c = int(torch.argmin(cells))
                cands.append((float(cells[c]), i, c))
            else:
                cands.extend((float(cells[c]), i, c) for c in range(hp * wp))
        cands.sort()
        top = cands[:k]
        out_d.append([t[0] for t in top])
        out_i.append([t[1] for t in top])
        out_p.append([(t[2] // wp, t[2] % wp) for t in top])
    return torch.tensor(out_d), torch.tensor(out_i), labels[torch.tensor(out_i)], out_p


@pytest.mark.parametrize("per_image", [True, False])
def test_nearest_patches_match_brute_force(per_image):
    data = NoiseDataset(n=13)
    model = tiny_model(prototypes_per_class=3, prototype_size=(2, 1), seed=3).eval()
    dist, idx, lab, pos = brute_force(model, data, k=5, per_image=per_image)
    for batch_size in (4, 13):  # the answer does not depend on the batching
        nearest, mins, labels, indices = find_nearest_patches(model, data, k=5, per_image=per_image, batch_size=batch_size)
        assert torch.equal(nearest.indices, idx)
        assert torch.equal(nearest.labels, lab)
        assert torch.allclose(nearest.distances, dist, atol=1e-5)
        assert [[tuple(p) for p in row] for row in nearest.positions.tolist()] == pos
        assert nearest.latent_size == (4, 4)
    assert indices.tolist() == list(range(13)) and labels.tolist() == data.targets
    with torch.no_grad():
        expected = model(torch.stack([data[i][0] for i in range(13)])).min_distances
    assert torch.allclose(mins, expected, atol=1e-5)


def test_fewer_candidates_than_k_are_padded():
    data = NoiseDataset(n=3)
    model = tiny_model(prototypes_per_class=1).eval()
    nearest, *_ = find_nearest_patches(model, data, k=5)
    assert (nearest.indices[:, :3] >= 0).all() and (nearest.indices[:, 3:] == -1).all()
    assert torch.isinf(nearest.distances[:, 3:]).all()


# -- re-fit, accuracy, saving and the report ------------------------------------------------------

def pushed_model(train: ProtoDataset, seed: int) -> ProtoPNet:
    from protopnet.train.push import push_prototypes

    model = tiny_model(prototypes_per_class=3, seed=seed).eval()
    push_prototypes(model, train)
    return model


def test_prune_refits_last_layer_and_reports_true_accuracies(tmp_path):
    train, test = NoiseDataset(n=18, seed=1), NoiseDataset(n=9, seed=2)
    model = pushed_model(train, seed=1)
    before_test = evaluate(model, test)["accuracy"]
    report = prune(model, train, k=6, threshold=3, test_dataset=test, iterations=30, lr=0.05)
    assert 0 < len(report.removed) < 9, "an untrained model has prototypes with mixed neighbours"
    assert model.num_prototypes == 9 - len(report.removed)
    kept_classes = [report.prototypes[j]["class_index"] for j in report.kept]
    assert model.prototype_classes.tolist() == kept_classes
    # accuracies computed from cached similarities equal real forward passes
    assert report.accuracy["test"]["before"] == pytest.approx(before_test)
    assert report.accuracy["test"]["after"] == pytest.approx(evaluate(model, test)["accuracy"])
    assert report.accuracy["train"]["after"] == pytest.approx(evaluate(model, train)["accuracy"])
    assert report.last_layer and "train_accuracy" in report.last_layer
    event = model.history[-1]
    assert event["event"] == "prune" and event["when"].endswith("Z")
    assert event["what"]["removed"] == report.removed and event["accuracy_after"]["test"] == report.accuracy["test"]["after"]


def test_refit_changes_only_last_layer_and_starts_from_pruned_weights():
    train = NoiseDataset(n=12, seed=4)
    model = pushed_model(train, seed=2)
    protos = model.prototypes.detach().clone()
    weight = model.last_layer.weight.detach().clone()
    report = prune(model, train, k=6, threshold=3, refit=False)
    assert 0 < len(report.removed) < 9
    keep = torch.tensor(report.kept)
    assert torch.equal(model.prototypes.detach(), protos[keep])
    assert torch.equal(model.last_layer.weight.detach(), weight[:, keep])
    assert report.accuracy["train"]["after"] == report.accuracy["train"]["after_removal"]


def pushed_model_dir(tmp_path: Path, train: ProtoDataset) -> Path:
    from protopnet import save_model
    from protopnet.train.push import push_prototypes

    model = tiny_model(prototypes_per_class=3, seed=5, class_names=train.classes).eval()
    push_prototypes(model, train)
    return save_model(model, tmp_path / "model", dataset=train, extra={"test_accuracy": 0.5})


def test_saved_pruned_model_and_escaped_report(tmp_path):
    train = NoiseDataset(n=12, seed=6)
    train.classes = ["<script>alert(1)</script>", "b&b", "c"]
    source = pushed_model_dir(tmp_path, train)
    model = load_model(source)
    report = prune(model, train, k=6, threshold=3, iterations=2)
    assert 0 < len(report.removed) < 9
    assert report.removed
    out = save_pruned(model, report, tmp_path / "pruned", dataset=train, source_directory=source)
    again = load_model(out)
    assert again.num_prototypes == len(report.kept)
    assert torch.equal(again.last_layer.weight, model.last_layer.weight)
    assert [e["prototype"] for e in again.provenance] == list(range(len(report.kept)))
    old = json.loads((source / "model.json").read_text())["provenance"]
    for new, j in enumerate(report.kept):  # provenance and pictures follow their prototype
        assert again.provenance[new]["dataset_index"] == old[j]["dataset_index"]
        patch = out / again.provenance[new]["images"]["patch"]
        assert patch.name.startswith(f"{new:04d}_")
        assert patch.read_bytes() == (source / old[j]["images"]["patch"]).read_bytes()
    assert again.history[-1]["event"] == "prune"
    extra = json.loads((out / "model.json").read_text())["extra"]
    assert extra["test_accuracy"] == 0.5 and extra["pruning"]["removed"] == report.removed
    data = json.loads((out / "pruning.json").read_text())
    assert data["removed"] == report.removed and data["rule"]["k"] == 6
    assert all(p["nearest"] for p in data["prototypes"])
    page = (out / "pruning.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "b&amp;b" in page and "data:image/png;base64," in page
    assert f"<strong>{len(report.removed)} pruned</strong>" in page


def test_refuses_to_prune_everything():
    data = shared_and_unique_data(per_class=4)
    model = colour_model([1])
    model.set_prototypes(latent_colour(WHITE).unsqueeze(0), torch.tensor([1]), torch.ones(3, 1))
    with pytest.raises(ValueError, match="nothing would be left"):
        prune(model, data, k=6, threshold=3)
    assert model.num_prototypes == 1


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_prune(tmp_path, capsys):
    from protopnet.cli import main

    train, test = NoiseDataset(n=12, seed=7), NoiseDataset(n=6, seed=8)
    write_folder(tmp_path / "data", train, "train")
    write_folder(tmp_path / "data", test, "test")
    source = pushed_model_dir(tmp_path, train)
    code = main(["-q", "prune", str(source), "--data", str(tmp_path / "data"), "--k", "6", "--threshold", "3", "--iterations", "3", "--out", str(tmp_path / "pruned")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pruned = load_model(tmp_path / "pruned")
    assert pruned.num_prototypes == summary["prototypes_after"] == 9 - summary["pruned"]
    assert summary["test_accuracy_before"] is not None
    assert (tmp_path / "pruned" / "pruning.html").is_file()
    assert main(["-q", "prune", str(source), "--data", str(tmp_path / "data"), "--k", "2", "--threshold", "3", "--out", str(tmp_path / "x")]) == 1
    assert "--threshold must be between 0 and --k" in capsys.readouterr().err
