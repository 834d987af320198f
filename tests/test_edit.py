"""Editing with a person in the loop: remove / relabel / replace, last-layer re-fit, accuracy
before and after, history, provenance of replaced prototypes, clear index errors, the CLI."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MarkedNoiseDataset, tiny_model, write_folder
from protopnet import ProtoPNet, load_model, save_model
from protopnet.data.base import ProtoDataset
from protopnet.edit import (
    PrototypeIndexError,
    Replacement,
    edit_model,
    patch_for_box,
    prepare_replacement,
    remove_prototypes,
    save_edited_model,
)
from protopnet.train.evaluate import evaluate
from protopnet.train.push import push_prototypes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def normalise(picture: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return ((array - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)).unsqueeze(0)


# -- mapping a box to a latent patch --------------------------------------------------------------

def test_patch_for_box_picks_cell_under_box_and_best_overlap():
    # 32 px, 4 x 4 latent: cell (r, c) covers x in [8c, 8c+8), y in [8r, 8r+8)
    assert patch_for_box([9, 9, 14, 14], 32, (4, 4), (1, 1)) == (1, 1)
    assert patch_for_box([25, 1, 31, 7], 32, (4, 4), (1, 1)) == (0, 3)
    assert patch_for_box([14, 17, 24, 23], 32, (4, 4), (1, 1)) == (2, 2)  # 2 px in col 1, 8 px in col 2
    assert patch_for_box([8, 8, 24, 24], 32, (4, 4), (2, 2)) == (1, 1)  # exactly cells (1..2, 1..2)
    assert patch_for_box([0, 0, 32, 32], 32, (4, 4), (2, 2)) == (1, 1)  # all overlap equally: centre wins
    with pytest.raises(ValueError, match="outside"):
        patch_for_box([40, 40, 50, 50], 32, (4, 4), (1, 1))
    with pytest.raises(ValueError, match="empty"):
        patch_for_box([10, 10, 10, 20], 32, (4, 4), (1, 1))


def test_replacement_vector_is_the_latent_patch_under_the_box(tmp_path):
    model = tiny_model(prototype_size=(2, 2)).eval()
    picture = MarkedNoiseDataset().load_image(1)
    with torch.no_grad():
        z = model.latent(normalise(picture))  # (1, 8, 4, 4)
    prepared = prepare_replacement(model, Replacement(0, image=picture, box=[8, 16, 24, 32]))
    assert prepared.position == (2, 1)
    assert torch.allclose(prepared.vector, z[0, :, 2:4, 1:3])
    assert prepared.activation.shape == (3, 3)
    assert float(prepared.activation[2, 1]) == pytest.approx(float(prepared.activation.max()))
    # a file of another size: the box is in the file's pixels and scales with the resize
    big = picture.resize((64, 128), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    scaled = prepare_replacement(model, Replacement(0, image=str(tmp_path / "big.png"), box=[16, 64, 48, 128]))
    assert scaled.position == (2, 1) and scaled.selected_box == [8.0, 16.0, 24.0, 32.0]
    assert scaled.path == str(tmp_path / "big.png")
    by_position = prepare_replacement(model, Replacement(0, image=picture, position=(1, 2)))
    assert torch.allclose(by_position.vector, z[0, :, 1:3, 2:4])
    with pytest.raises(ValueError, match=r"latent position \(3, 0\) is outside.*rows 0\.\.2"):
        prepare_replacement(model, Replacement(0, image=picture, position=(3, 0)))
    with pytest.raises(ValueError, match="exactly one of a box"):
        prepare_replacement(model, Replacement(0, image=picture, box=[0, 0, 8, 8], position=(0, 0)))


# -- indices ---------------------------------------------------------------------------------------

def test_bad_indices_name_the_index_and_the_range():
    model = tiny_model().eval()
    with pytest.raises(PrototypeIndexError, match=r"remove index 17 is out of range: this model has 6 prototypes \(valid indices 0\.\.5\)"):
        edit_model(model, remove=[3, 17], refit=False)
    with pytest.raises(PrototypeIndexError, match=r"relabel index -1 is out of range"):
        edit_model(model, relabel={-1: 0}, refit=False)
    with pytest.raises(PrototypeIndexError, match=r"replace index 6"):
        edit_model(model, replace=[Replacement(6, image=MarkedNoiseDataset().load_image(0), position=(0, 0))], refit=False)
    with pytest.raises(ValueError, match=r"class index 3 is out of range.*3 classes"):
        edit_model(model, relabel={1: 3}, refit=False)
    with pytest.raises(ValueError, match=r"\[2\] are both removed and relabelled"):
        edit_model(model, remove=[2], relabel={2: 0}, refit=False)
    with pytest.raises(ValueError, match="refusing to remove all 6"):
        remove_prototypes(model, range(6))
    assert model.num_prototypes == 6 and model.history == []


# -- the whole edit --------------------------------------------------------------------------------

def test_edit_applies_all_changes_refits_and_measures(tmp_path):
    train, test = MarkedNoiseDataset(n=15, seed=1), MarkedNoiseDataset(n=9, seed=2)
    model = tiny_model(prototypes_per_class=2, seed=3).eval()
    push_prototypes(model, train)
    old_protos = model.prototypes.detach().clone()
    old_classes = model.prototype_classes.clone()
    old_weight = model.last_layer.weight.detach().clone()
    old_prov = [dict(e) for e in model.provenance]
    test_before = evaluate(model, test)["accuracy"]
    picture = train.load_image(4)
    report = edit_model(
        model, train, test_dataset=test,
        remove=[0, 3], relabel={5: 0}, replace=[Replacement(4, image=picture, box=[16, 8, 24, 16])],
        iterations=15, lr=0.05,
    )
    # numbering: kept old 1, 2, 4, 5 -> new 0, 1, 2, 3
    assert report.kept == [1, 2, 4, 5] and model.num_prototypes == 4
    assert torch.equal(model.prototypes.detach()[0], old_protos[1]) and torch.equal(model.prototypes.detach()[3], old_protos[5])
    with torch.no_grad():
        z = model.latent(normalise(picture))
    assert torch.allclose(model.prototypes.detach()[2], z[0, :, 1:2, 2:3])
    assert model.prototype_classes.tolist() == [old_classes[1], old_classes[2], old_classes[4], 0]
    assert report.relabelled == {5: (int(old_classes[5]), 0)}
    # provenance: renumbered; replaced prototype points at the new source; relabelled one moved class
    assert [e["prototype"] for e in model.provenance] == [0, 1, 2, 3]
    assert model.provenance[0]["dataset_index"] == old_prov[1]["dataset_index"]
    replaced = model.provenance[2]
    assert replaced["source"] == "edit" and replaced["dataset_index"] is None and replaced["position"] == [1, 2]
    assert replaced["selected_box"] == [16.0, 8.0, 24.0, 16.0] and len(replaced["activation"]) == 4
    x0, y0, x1, y1 = replaced["box"]
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    assert replaced["distance"] == pytest.approx(float(((old_protos[4] - z[0, :, 1:2, 2:3]) ** 2).sum()), rel=1e-5)
    assert model.provenance[3]["class_index"] == 0 and model.provenance[3]["relabelled_from"] == int(old_classes[5])
    # the last layer was re-fitted (it moved away from the sliced old weights)
    assert not torch.allclose(model.last_layer.weight.detach(), old_weight[:, [1, 2, 4, 5]])
    # accuracies from cached similarities equal real forward passes, before and after
    assert report.accuracy_before["test"] == pytest.approx(test_before)
    assert report.accuracy_after["test"] == pytest.approx(evaluate(model, test)["accuracy"])
    assert report.accuracy_after["train"] == pytest.approx(evaluate(model, train)["accuracy"])
    event = model.history[-1]
    assert event["event"] == "edit" and event["what"]["removed"] == [0, 3]
    assert event["what"]["relabelled"] == {"5": {"from": int(old_classes[5]), "to": 0}}
    assert event["what"]["replaced"][0]["prototype"] == 4 and event["what"]["replaced"][0]["prototype_after"] == 2
    when = dt.datetime.fromisoformat(event["when"].replace("Z", "+00:00"))
    assert when.tzinfo is not None and abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 600
    assert event["accuracy_before"] == report.accuracy_before and event["accuracy_after"] == report.accuracy_after


def test_relabel_resets_column_and_no_refit_keeps_other_weights():
    model = tiny_model().eval()
    weight = model.last_layer.weight.detach().clone()
    report = edit_model(model, relabel={1: 2}, refit=False)
    assert model.prototype_classes[1] == 2
    assert model.last_layer.weight[:, 1].tolist() == [-0.5, -0.5, 1.0]
    others = [0, 2, 3, 4, 5]
    assert torch.equal(model.last_layer.weight.detach()[:, others], weight[:, others])
    assert report.accuracy_before == {"train": None, "test": None}


def test_saved_edited_model_keeps_history_provenance_and_pictures(tmp_path):
    train = MarkedNoiseDataset(n=9, seed=3)
    model = tiny_model(seed=4).eval()
    push_prototypes(model, train)
    source = save_model(model, tmp_path / "model", dataset=train)
    loaded = load_model(source)
    report = edit_model(loaded, train, remove=[1], replace=[Replacement(2, dataset_index=7, position=(2, 3))], iterations=2)
    out = save_edited_model(loaded, tmp_path / "edited", pictures=report.pictures)
    again = load_model(out)
    assert again.num_prototypes == 5 and again.history[-1]["event"] == "edit"
    assert torch.equal(again.prototypes, loaded.prototypes)
    entry = again.provenance[1]  # old 2, replaced from dataset item 7
    assert entry["dataset_index"] == 7 and entry["path"] == train.path(7) and entry["position"] == [2, 3]
    for kind in ("patch", "source", "overlay"):
        assert (out / entry["images"][kind]).is_file() and entry["images"][kind].startswith("prototypes/0001_")
    old = json.loads((source / "model.json").read_text())["provenance"]
    assert (out / again.provenance[2]["images"]["patch"]).read_bytes() == (source / old[3]["images"]["patch"]).read_bytes()
    assert not (out / "prototypes" / "0005_patch.png").exists()


# -- CLI --------------------------------------------------------------------------------------------

def test_cli_edit(tmp_path, capsys):
    from protopnet.cli import main

    train, test = MarkedNoiseDataset(n=9, seed=5), MarkedNoiseDataset(n=6, seed=6)
    write_folder(tmp_path / "data", train, "train")
    write_folder(tmp_path / "data", test, "test")
    model = tiny_model(seed=6).eval()
    model.class_names = list(train.classes)
    source = save_model(model, tmp_path / "model")
    image = tmp_path / "photo.png"
    train.load_image(2).resize((64, 64)).save(image)
    args = ["-q", "edit", str(source), "--remove", "0,3", "--relabel", "5:c1", "--replace", f"4:{image}:0,0,16,16",
            "--data", str(tmp_path / "data"), "--iterations", "2", "--out", str(tmp_path / "edited")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    edited = load_model(tmp_path / "edited")
    assert edited.num_prototypes == summary["prototypes"] == 4
    assert edited.prototype_classes[3] == 1
    assert edited.history[-1]["what"]["replaced"][0]["position"] == [0, 0]
    assert summary["accuracy_before"]["test"] is not None and summary["accuracy_after"]["test"] is not None
    code = main(["-q", "edit", str(source), "--remove", "3,17", "--iterations", "0", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 1 and "remove index 17 is out of range" in err and "0..5" in err
    assert not (tmp_path / "bad").exists()
    assert main(["-q", "edit", str(source), "--replace", "4:nothing", "--iterations", "0", "--out", str(tmp_path / "bad")]) == 1
    assert "expected J:IMAGE" in capsys.readouterr().err
