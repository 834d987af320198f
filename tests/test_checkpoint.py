"""Model directories: round trip, integrity, and refusing anything that could run code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from protopnet import CheckpointError, UnsafeCheckpointError, load_model, save_model
from protopnet.atomic_files import atomic_write_bytes
from protopnet.checkpoint import flatten_state, unflatten_state
from protopnet.train.push import push_prototypes

from conftest import ColourDataset, tiny_model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    data = ColourDataset()
    model = tiny_model(prototype_size=(2, 2), class_names=["a", "b", "c"]).eval()
    push_prototypes(model, data)
    save_model(model, tmp_path / "m", dataset=data)
    loaded = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b)
    assert loaded.class_names == ["a", "b", "c"] and loaded.image_size == 32
    assert [p["dataset_index"] for p in loaded.provenance] == [p["dataset_index"] for p in model.provenance]
    for entry in loaded.provenance:
        for relative in entry["images"].values():
            assert (tmp_path / "m" / relative).is_file()
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "model.json", "prototypes"} <= files
    assert not any(name.endswith((".pt", ".pth", ".pkl")) for name in files)


def test_a_model_without_add_on_layers_round_trips(tmp_path):
    data = ColourDataset()
    model = tiny_model(prototype_dim=128, add_on="none", distance="cosine").eval()
    push_prototypes(model, data)
    save_model(model, tmp_path / "m", dataset=data)
    loaded = load_model(tmp_path / "m")
    assert loaded.add_on_kind == "none" and len(loaded.add_on) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits)


def test_a_cosine_model_pushes_onto_real_patches_and_round_trips(tmp_path):
    """With the cosine distance, push still snaps every prototype onto a training patch (distance 0
    at its source); the saved model measures the angle again, and a model.json written before the
    option existed (no ``distance`` key) loads with the paper's L2 distance."""
    data = ColourDataset()
    model = tiny_model(class_names=["a", "b", "c"], distance="cosine").eval()
    push_prototypes(model, data)
    with torch.no_grad():
        for j, entry in enumerate(model.provenance):
            image = data[entry["dataset_index"]][0][None]
            d = model.distances(model.latent(image))[0, j]  # (H', W')
            assert float(d.min()) == pytest.approx(0.0, abs=1e-5)
    save_model(model, tmp_path / "m", dataset=data)
    loaded = load_model(tmp_path / "m")
    assert loaded.distance == "cosine"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["architecture"].pop("distance")
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "m").distance == "l2"
    meta["architecture"]["distance"] = "manhattan"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="distance"):
        load_model(tmp_path / "m")


def test_truncated_tensors_are_detected(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(tmp_path / "m")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PROTOPNET_EXPLOIT_MARKER']}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "exploit-ran"
    monkeypatch.setenv("PROTOPNET_EXPLOIT_MARKER", str(marker))
    for name in ("model.pt", "model.pth", "weights.bin", "innocent.json"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(UnsafeCheckpointError):
            load_model(path)
    # a directory holding only a pickle
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model.pth").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafeCheckpointError):
        load_model(tmp_path / "dir")
    # a model directory whose tensor file was replaced by a pickle
    save_model(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    assert not marker.exists(), "loading must never execute code"


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    # safetensors starts with its header length (8 bytes, little-endian): 0x980 starts with 0x80,
    # the pickle protocol marker (a saved model's tensor file had exactly this header).
    from protopnet.checkpoint import refuse_pickle
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n] + b" " * (0x980 - n)  # JSON may end in spaces
    path.write_bytes((0x980).to_bytes(8, "little") + header + data[8 + n :])
    assert path.read_bytes()[:1] == b"\x80"
    refuse_pickle(path)
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(UnsafeCheckpointError):
        refuse_pickle(path)


def test_paths_in_model_json_cannot_leave_the_directory(tmp_path):
    data = ColourDataset()
    model = tiny_model()
    push_prototypes(model, data)
    save_model(model, tmp_path / "m", dataset=data)
    meta_path = tmp_path / "m" / "model.json"
    for bad in ("../../etc/passwd", "/etc/passwd", "prototypes/../../x.png"):
        meta = json.loads(meta_path.read_text())
        meta["provenance"][0]["images"]["patch"] = bad
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="outside|relative"):
            load_model(tmp_path / "m")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.json"):
        load_model(tmp_path / "empty")


def test_saving_over_a_model_replaces_it_whole(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")
    torch.testing.assert_close(load_model(tmp_path / "m").prototypes, second.prototypes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temporary directories left behind"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_state_flattening_round_trips():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    skeleton, tensors = flatten_state(opt.state_dict())
    json.dumps(skeleton)
    restored = unflatten_state(skeleton, tensors)
    assert restored["param_groups"] == opt.state_dict()["param_groups"]
    torch.testing.assert_close(restored["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_storage_takes_the_pictures_its_caller_drew(tmp_path):
    """checkpoint.save_model only stores: given the pictures drawn by
    visualize.draw_prototype_pictures it writes the same directory as protopnet.save_model(dataset=)."""
    from protopnet.checkpoint import save_model as store_model
    from protopnet.visualize import draw_prototype_pictures

    data = ColourDataset()
    model = tiny_model(class_names=["a", "b", "c"]).eval()
    push_prototypes(model, data)
    save_model(model, tmp_path / "drawn" / "m", dataset=data)
    store_model(model, tmp_path / "stored" / "m", pictures=draw_prototype_pictures(model.provenance, data))

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    drawn, stored = files(tmp_path / "drawn" / "m"), files(tmp_path / "stored" / "m")
    assert sum(name.startswith("prototypes/") for name in drawn) == 3 * model.num_prototypes
    assert drawn == stored


def test_pictures_drawn_in_chunks_equal_those_drawn_one_by_one_and_skip_unreadable_sources():
    """draw_prototype_pictures reads sources on threads and upsamples a chunk's maps in one call;
    each prototype's pictures must be exactly prototype_pictures of its own entry, in
    provenance order, whatever the chunk size, and a prototype whose source cannot be read is
    left out (the others are still drawn)."""
    import numpy as np

    from protopnet.visualize import draw_prototype_pictures, prototype_pictures

    data = ColourDataset()
    model = tiny_model(class_names=["a", "b", "c"]).eval()
    provenance = push_prototypes(model, data)
    expected = [(e["prototype"], prototype_pictures(data.load_image(e["dataset_index"]), e["activation"], e["box"])) for e in provenance]
    for chunk in (1, 4, 64):
        drawn = list(draw_prototype_pictures(provenance, data, chunk=chunk, workers=2))
        assert [j for j, _ in drawn] == [j for j, _ in expected]
        for (_, got), (_, want) in zip(drawn, expected):
            assert set(got) == {"patch", "source", "overlay"}
            for kind in want:
                assert np.array_equal(np.asarray(got[kind]), np.asarray(want[kind])), kind

    broken = provenance[2]["dataset_index"]

    class Unreadable(ColourDataset):
        def load_image(self, index):
            if index == broken:
                raise OSError("truncated file")
            return super().load_image(index)

    drawn = [j for j, _ in draw_prototype_pictures(provenance, Unreadable(), chunk=4)]
    assert drawn == [e["prototype"] for e in provenance if e["dataset_index"] != broken]


def test_heatmap_colours_are_matplotlibs():
    """The table lookup gives exactly the colours of calling the colormap on the normalised map
    (edges, constant maps and the top value included)."""
    import matplotlib
    import numpy as np

    from protopnet.visualize import heatmap

    g = np.random.default_rng(0)
    for up in (g.normal(size=(30, 40)), np.full((5, 5), 2.0), np.linspace(0, 1, 1200).reshape(30, 40)):
        up = up.astype(np.float32)
        lo, hi = float(up.min()), float(up.max())
        norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
        for name in ("jet", "viridis"):
            want = (matplotlib.colormaps[name](norm)[..., :3] * 255).astype(np.uint8)
            assert np.array_equal(np.asarray(heatmap(up, name)), want)
