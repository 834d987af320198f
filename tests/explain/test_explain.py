"""protopnet.explain: score sheets that add up to the logits, boxes as push draws them, nearest
patches equal to a brute-force search, ensembles, and the ``explain`` / ``analyze`` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protopnet
from protopnet.explain import activation_boxes, explain, nearest_patches, scale_box
from protopnet.explain.nearest import TopK
from protopnet.regions import activation_box

from conftest import ColourDataset, tiny_model

XSS = "<script>alert(1)</script>"


def sparse_last_layer(model, seed: int = 0) -> None:
    """Random last-layer weights with exact zeros: own-class zeros and other-class zeros both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(model.last_layer.weight.shape, generator=g)
        w[torch.rand(w.shape, generator=g) < 0.4] = 0.0
        w[0, int(torch.nonzero(model.prototype_classes == 0)[0])] = 0.0  # an own-class prototype with weight 0
        model.last_layer.weight.copy_(w)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pushed tiny model (64 px, 2x2 prototypes) saved with its prototype pictures."""
    data = ColourDataset(num_classes=3, per_class=4, image_size=64)
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_size=(2, 2), class_names=[XSS, "a & b", "colour_2"])
    model.image_size = 64
    model.mean, model.std = data.mean, data.std
    protopnet.push(model, data, batch_size=6)
    sparse_last_layer(model)
    directory = protopnet.save_model(model, tmp_path_factory.mktemp("model") / "model", dataset=data)
    return protopnet.load_model(directory), data, directory


# -- score sheets --------------------------------------------------------------------------------

def test_score_sheets_add_up_to_the_logits_and_list_the_right_prototypes():
    model = tiny_model(num_classes=3, prototypes_per_class=2)
    sparse_last_layer(model, seed=1)
    data = ColourDataset(num_classes=3, per_class=1)
    x = data[1][0]
    with torch.no_grad():
        out = model.eval()(x[None])
    e = explain(model, x, top_classes=3, top_prototypes=4)

    assert e.predicted == int(out.logits[0].argmax())
    np.testing.assert_allclose(e.probabilities, torch.softmax(out.logits[0].double(), 0).numpy(), rtol=1e-6)
    assert [s.class_index for s in e.classes] == torch.argsort(out.logits[0], descending=True).tolist()
    w = model.last_layer.weight.detach()
    for sheet in e.classes:
        k = sheet.class_index
        expected = {j for j in range(model.num_prototypes) if int(model.prototype_classes[j]) == k or float(w[k, j]) != 0.0}
        assert {r.match.prototype for r in sheet.rows} == expected
        assert math.fsum(r.points for r in sheet.rows) == sheet.logit  # exactly
        assert sheet.logit == pytest.approx(float(out.logits[0, k]), abs=1e-5)
        for row in sheet.rows:
            j = row.match.prototype
            assert row.similarity == pytest.approx(float(out.similarities[0, j]), abs=1e-6)
            assert row.weight == float(w[k, j])
            assert row.points == row.similarity * row.weight
            assert row.negative_reasoning == (int(model.prototype_classes[j]) != k)
        assert [r.points for r in sheet.rows] == sorted((r.points for r in sheet.rows), reverse=True)
    # the own-class prototype with weight 0 is listed (0 points), zero-weight other-class ones are not
    sheet0 = e.sheet(0)
    assert any(r.own_class and r.weight == 0.0 for r in sheet0.rows)
    assert all(r.weight != 0.0 for r in sheet0.rows if not r.own_class)
    # top prototypes: the most similar over all classes
    sims = out.similarities[0]
    assert [m.prototype for m in e.top_prototypes] == torch.argsort(sims, descending=True)[:4].tolist()


def test_boxes_are_the_push_rule_on_the_input_activation_map():
    model = tiny_model(num_classes=2, prototypes_per_class=3, prototype_size=(2, 1)).eval()
    x = ColourDataset(num_classes=2, per_class=1, image_size=48)[0][0]
    e = explain(model, x, top_classes=2)
    with torch.no_grad():
        maps = model.similarity(model.distances(model.latent(x[None])))[0]  # (M, H', W')
    assert maps.shape[1:] == (5, 6)  # 6x6 latent, 2x1 prototypes
    for j, match in enumerate(e.matches):
        box, _ = activation_box(maps[j], (48, 48))
        assert match.box == box
        np.testing.assert_allclose(match.activation, maps[j].numpy(), rtol=1e-6)
        r, c = match.position
        assert float(maps[j, r, c]) == pytest.approx(float(maps[j].max()), abs=1e-6)


@pytest.mark.parametrize("size,percentile", [((32, 32), 95.0), ((224, 224), 95.0), ((40, 24), 80.0)])
def test_batched_boxes_equal_the_regions_function(size, percentile):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(9, 7, 5, generator=g) ** 3
    maps[3] = 1.0  # a flat map: the box is the whole picture
    expected = [activation_box(maps[p], size, percentile)[0] for p in range(9)]
    assert activation_boxes(maps, size, percentile).tolist() == expected


def test_scale_box_maps_the_model_frame_to_the_original_file():
    assert scale_box([0, 0, 64, 64], (64, 64), (200, 100)) == [0, 0, 200, 100]
    assert scale_box([16, 8, 33, 40], (64, 64), (128, 32)) == [32, 4, 66, 20]
    assert scale_box([10, 10, 11, 11], (64, 64), (100, 100)) == [15, 15, 18, 18]  # covers the region


def test_path_pil_and_tensor_inputs_agree_and_boxes_map_to_the_file(tmp_path):
    model = tiny_model(num_classes=3)
    model.image_size = 32
    data = ColourDataset(num_classes=3, per_class=1)
    picture = data.load_image(2).resize((96, 48))  # a non-square file
    path = tmp_path / "bird.png"
    picture.save(path)
    from protopnet.data.images import fit_square

    tensor = data.to_tensor(fit_square(picture, 32))
    model.mean, model.std = data.mean, data.std
    by_path, by_pil, by_tensor = explain(model, path), explain(model, picture), explain(model, tensor)
    np.testing.assert_allclose(by_path.logits, by_tensor.logits, rtol=1e-6)
    np.testing.assert_allclose(by_pil.logits, by_tensor.logits, rtol=1e-6)
    assert by_path.input.path == str(path) and by_path.input.original_size == (96, 48)
    for match in by_path.matches:
        assert match.box_original == scale_box(match.box, (32, 32), (96, 48))
    assert by_tensor.matches[0].box_original is None
    blob = json.loads(json.dumps(by_path.to_json()))
    assert blob["classes"][0]["prototypes"][0]["box_original"] == by_path.classes[0].rows[0].match.box_original


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        explain(tiny_model(), bad)


def test_explain_restores_training_mode_and_leaves_no_gradients():
    model = tiny_model()
    model.train()
    x = ColourDataset(per_class=1)[0][0]
    explain(model, x)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backbone,size,prototype_size", [("tiny_cnn", 32, (3, 3)), ("resnet18", 64, (1, 2))])
def test_any_backbone_and_prototype_size(backbone, size, prototype_size):
    torch.manual_seed(0)
    model = protopnet.ProtoPNet(backbone=backbone, pretrained=False, num_classes=2, prototypes_per_class=2, prototype_dim=8, prototype_size=prototype_size)
    model.image_size = size
    x = torch.randn(3, size, size)
    e = explain(model, x, top_classes=2)
    with torch.no_grad():
        logits = model.eval()(x[None]).logits[0]
    for sheet in e.classes:
        assert sheet.logit == pytest.approx(float(logits[sheet.class_index]), abs=1e-4)
    for match in e.matches:
        x0, y0, x1, y1 = match.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_ensemble_score_sheet_is_the_union_of_the_members(saved, tmp_path):
    from protopnet.ensemble import Ensemble

    _, data, directory = saved
    model = protopnet.load_model(directory)  # a copy: saving the ensemble re-points its members' directories
    other = tiny_model(num_classes=3, prototypes_per_class=1, prototype_size=(1, 1), seed=3, class_names=model.class_names)
    other.image_size, other.mean, other.std = 32, model.mean, model.std  # a different input size
    ensemble = Ensemble([model, other]).eval()
    picture = data.load_image(5)
    e = explain(ensemble, picture, top_classes=3)
    x = data.to_tensor(picture)[None]
    with torch.no_grad():
        logits = ensemble(x).logits[0]
    assert len(e.matches) == model.num_prototypes + other.num_prototypes
    assert {m.member for m in e.matches} == {0, 1}
    for sheet in e.classes:
        assert sheet.logit == pytest.approx(float(logits[sheet.class_index]), abs=1e-5)
        assert {r.match.member for r in sheet.rows} == {0, 1}
    blob = e.to_json()
    assert all("member" in row for sheet in blob["classes"] for row in sheet["prototypes"])
    assert all(0 <= v <= 64 for m in e.matches for v in m.box)  # member 1's maps are drawn in the 64 px frame
    # the command explains a saved ensemble too, with each member's own prototype pictures
    ensemble.save(tmp_path / "ensemble")
    picture.save(tmp_path / "in.png")
    assert run_cli("explain", tmp_path / "ensemble", tmp_path / "in.png", "--out", tmp_path / "out") == 0
    blob = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert blob["classes"][0]["logit"] == pytest.approx(e.classes[0].logit, abs=1e-5)
    assert any(p["prototype_images"] and p["member"] == 0 for p in blob["prototypes"])


# -- pictures, JSON, figure -----------------------------------------------------------------------

def test_prototype_pictures_come_from_the_model_directory(saved):
    model, data, directory = saved
    e = explain(model, data.load_image(0))
    match = e.matches[3]
    assert match.images["patch"] == Path(directory) / model.provenance[3]["images"]["patch"]
    with Image.open(match.images["source"]) as saved_picture:
        assert np.array_equal(np.asarray(e.prototype_picture(match, "source")), np.asarray(saved_picture.convert("RGB")))
    unpushed = explain(tiny_model(), ColourDataset(per_class=1)[0][0])
    assert unpushed.matches[0].images == {} and unpushed.prototype_picture(unpushed.matches[0], "patch") is None


def test_to_json_has_the_documented_schema(saved):
    model, data, _ = saved
    e = explain(model, data.load_image(4), top_classes=2, top_prototypes=3)
    blob = json.loads(json.dumps(e.to_json()))  # JSON-able
    assert blob["predicted"] == {"class_index": e.predicted, "class_name": model.class_names[e.predicted], "probability": pytest.approx(float(e.probabilities[e.predicted]))}
    assert len(blob["classes"]) == 2 and len(blob["top_prototypes"]) == 3
    for sheet in blob["classes"]:
        assert set(sheet) >= {"class_index", "class_name", "logit", "probability", "prototypes"}
        assert math.fsum(r["points"] for r in sheet["prototypes"]) == sheet["logit"]
        for row in sheet["prototypes"]:
            assert set(row) >= {"prototype", "similarity", "weight", "points", "box", "negative_reasoning"}
            x0, y0, x1, y1 = row["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert len(blob["prototypes"]) == model.num_prototypes
    assert np.array(blob["prototypes"][0]["activation"]).shape == (7, 7)  # 8x8 latent, 2x2 prototypes
    assert "bicubic" in blob["upsampling"]


def test_to_figure_draws_the_figure_3_layout(saved, tmp_path):
    model, data, _ = saved
    e = explain(model, data.load_image(2), top_classes=3)  # every class, so the escaped name shows
    fig = e.to_figure(max_rows=3)
    pictures = [ax for ax in fig.axes if ax.images]
    shown = sum(min(3, len(s.rows)) for s in e.classes)
    assert len(pictures) == 4 * shown  # input | prototype | source | activation, every row
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert f"{e.classes[0].logit:.3f}" in texts and any(XSS in t for t in texts)
    fig.savefig(tmp_path / "figure.png", dpi=50)
    assert (tmp_path / "figure.png").stat().st_size > 1000


# -- global analysis ----------------------------------------------------------------------------

def test_nearest_patches_equal_a_brute_force_search():
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_size=(2, 2)).eval()
    data = ColourDataset(num_classes=3, per_class=5)
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(len(data))])
        d = model.distances(model.latent(x))  # (N, M, H', W')
    n, m, hp, wp = d.shape
    dmin, where = d.flatten(2).min(dim=2)  # (N, M)
    k = 4
    for batch_size in (n, 4):
        near = nearest_patches(model, data, k, batch_size=batch_size)
        assert near.scanned == n
        for j in range(m):
            order = sorted(range(n), key=lambda i: (float(dmin[i, j]), i))[:k]
            assert near.indices[j].tolist() == order
            np.testing.assert_allclose(near.distances[j].numpy(), dmin[order, j].numpy(), rtol=1e-5, atol=1e-6)
            assert near.labels[j].tolist() == [data.targets[i] for i in order]
            assert near.positions[j].tolist() == [[int(where[i, j]) // wp, int(where[i, j]) % wp] for i in order]
            np.testing.assert_allclose(near.activations[j].numpy(), model.similarity(d[order, j]).numpy(), rtol=1e-5)
        same = (near.labels == model.prototype_classes.view(-1, 1)).float().mean(dim=1)
        np.testing.assert_allclose(near.purity().numpy(), same.numpy())
    boxes = near.boxes()
    assert boxes[0, 0].tolist() == activation_box(near.activations[0, 0], (32, 32))[0]


def test_running_top_k_breaks_ties_by_dataset_index_whatever_the_batch_order():
    d = torch.tensor([[1.0, 2.0], [1.0, 0.5], [0.5, 2.0], [1.0, 0.5]]).view(4, 2, 1, 1)  # (N=4, M=2, 1, 1)
    labels, indices = torch.tensor([0, 1, 0, 1]), torch.tensor([10, 11, 12, 13])
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        top = TopK(2, 3)
        for i in order:  # one image per batch
            top.update(d[i : i + 1], labels[i : i + 1], indices[i : i + 1])
        results.append(top.indices.tolist())
        assert top.result(torch.tensor([0, 1]), 8, similarity=lambda t: -t).activations[1, 0].item() == -0.5
    assert results[0] == results[1] == results[2] == [[12, 10, 11], [11, 13, 10]]


def test_fewer_images_than_k_leaves_empty_slots():
    model = tiny_model(num_classes=2, prototypes_per_class=1)
    data = ColourDataset(num_classes=2, per_class=1)
    near = nearest_patches(model, data, 5, batch_size=2)
    assert near.found.sum(dim=1).tolist() == [2, 2]
    assert near.indices[:, 2:].eq(-1).all()
    assert near.boxes()[:, 2:].sum() == 0


# -- the commands --------------------------------------------------------------------------------

def run_cli(*argv):
    from protopnet.cli import main

    return main(["-q", *map(str, argv)])


def test_cli_explain_one_image(saved, tmp_path, capsys):
    model, data, directory = saved
    image = tmp_path / "in.png"
    data.load_image(7).resize((80, 120)).save(image)
    out = tmp_path / "out"
    assert run_cli("explain", directory, image, "--out", out, "--top-classes", "2", "--figure") == 0
    blob = json.loads((out / "explanation.json").read_text())
    expected = explain(model, image, top_classes=2)
    assert blob["predicted"]["class_index"] == expected.predicted
    assert [s["class_index"] for s in blob["classes"]] == [s.class_index for s in expected.classes]
    assert blob["input"]["original_size"] == [80, 120]
    page = (out / "index.html").read_text()
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (out / "figure.png").is_file() and (out / "images" / "input.png").is_file()
    assert "report:" in capsys.readouterr().out


def test_cli_explain_several_images_get_one_folder_each(saved, tmp_path):
    _, data, directory = saved
    paths = []
    for i in (0, 5):
        paths.append(tmp_path / f"img{i}.png")
        data.load_image(i).save(paths[-1])
    out = tmp_path / "out"
    assert run_cli("explain", directory, *paths, "--out", out) == 0
    listing = json.loads((out / "explanations.json").read_text())["explanations"]
    assert [e["directory"] for e in listing] == ["01-img0", "02-img5"]
    for entry in listing:
        assert json.loads((out / entry["directory"] / "explanation.json").read_text())["predicted"]["class_name"] == entry["class_name"]
    assert 'href="01-img0/index.html"' in (out / "index.html").read_text()


def test_cli_explain_unreadable_image_is_one_line_and_non_zero(saved, tmp_path, capsys):
    _, data, directory = saved
    good = tmp_path / "good.png"
    data.load_image(0).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:60])
    out = tmp_path / "out"
    assert run_cli("explain", directory, good, bad, "--out", out) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated.png" in err and ": " in err.split("truncated.png", 1)[1]
    assert not out.exists()  # nothing written


def test_cli_analyze_writes_a_gallery_with_purity(saved, tmp_path):
    model, _, directory = saved
    weird = '<img src=x onerror=alert(1)> & "q"'
    root = tmp_path / "data"
    source = ColourDataset(num_classes=3, per_class=3, image_size=64)
    for split, offset in (("train", 0), ("test", 1)):
        for i in range(len(source)):
            name = ["c0", weird, "c2"][source.targets[i]]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            source.load_image((i + offset) % len(source)).save(folder / f"{i}.png")
    out = tmp_path / "analysis"
    assert run_cli("analyze", directory, "--data", root, "--out", out, "--k", "3") == 0
    blob = json.loads((out / "analysis.json").read_text())
    assert set(blob["splits"]) == {"train", "test"}
    train = blob["splits"]["train"]
    assert train["images_scanned"] == 9 and len(train["prototypes"]) == model.num_prototypes
    for entry in train["prototypes"]:
        patches = entry["patches"]
        assert len(patches) == 3 and [p["distance"] for p in patches] == sorted(p["distance"] for p in patches)
        assert entry["purity"] == pytest.approx(sum(p["label"] == entry["class_index"] for p in patches) / 3)
    page = (out / "index.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;q&quot;" in page  # file paths, escaped
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # class names, escaped
    assert page.count('class="card prototype-card"') == model.num_prototypes
    assert page.count('class="proto-detail"') == model.num_prototypes
