"""``model.prototype_init: distinctive``: prototypes start on the patches only their class has."""

from __future__ import annotations

import json

import pytest
import torch

from protopnet.config import load_config
from protopnet.train import Trainer
from protopnet.train.prototype_init import distinctive_patches, latent_patches

from conftest import tiny_model


def planted(num_classes=3, per_class=4, d=8, size=5, seed=0):
    """Latent maps of shared background (every class draws from the same distribution) with one
    cell per picture holding its class's vector plus noise. Returns z, labels, planted cells."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    z = torch.rand(n, d, size, size, generator=g)  # background: the same for every class
    codes = torch.rand(num_classes, d, generator=g) * 3 + 2  # far from the background's [0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    cells = torch.randint(size * size, (n,), generator=g)
    for i in range(n):
        r, c = divmod(int(cells[i]), size)
        z[i, :, r, c] = codes[labels[i]] + 0.05 * torch.rand(d, generator=g)
    return z, labels, cells


def test_latent_patches_are_the_windows_of_the_map():
    z = torch.randn(2, 3, 4, 5)
    patches = latent_patches(z, (2, 3))  # (N, P, D*h*w), P = 3 x 3 positions
    assert patches.shape == (2, 9, 18)
    for r in range(3):
        for c in range(3):
            assert torch.equal(patches[1, r * 3 + c].view(3, 2, 3), z[1, :, r : r + 2, c : c + 3])


def test_each_prototype_starts_on_its_class_planted_part_on_different_pictures():
    z, labels, cells = planted()
    classes = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    prototypes, picture, position = distinctive_patches(z, labels, classes, (1, 1), neighbours=3)
    assert prototypes.shape == (7, 8, 1, 1)
    for j in range(7):
        assert int(labels[picture[j]]) == int(classes[j])  # a picture of its own class
        assert int(position[j]) == int(cells[picture[j]])  # on the planted part, not background
        r, c = divmod(int(position[j]), 5)
        assert torch.equal(prototypes[j, :, 0, 0], z[picture[j], :, r, c])  # exactly that patch
    for k in range(3):  # a class's prototypes start on different pictures
        mine = picture[classes == k].tolist()
        assert len(set(mine)) == len(mine)


def test_distinctiveness_is_the_share_of_own_class_neighbours_by_brute_force():
    """The chosen patch of a one-prototype class is the one with the highest share of own-class
    patches among its nearest patches of other pictures, computed here pair by pair."""
    g = torch.Generator().manual_seed(4)
    z, labels = torch.rand(6, 4, 3, 3, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    patches = latent_patches(z, (1, 1))  # (6, 9, 4)
    k = 4
    best = {}
    for i in range(6):
        for p in range(9):
            others = [(float(((patches[i, p] - patches[o, q]) ** 2).sum()), int(labels[o]))
                      for o in range(6) if o != i for q in range(9)]
            share = sum(lab == int(labels[i]) for _, lab in sorted(others)[:k]) / k
            best.setdefault(int(labels[i]), []).append((share, i, p))
    _, picture, position = distinctive_patches(z, labels, torch.tensor([0, 1]), (1, 1), neighbours=k)
    for j, k_class in enumerate((0, 1)):
        top_share = max(s for s, _, _ in best[k_class])
        chosen = [s for s, i, p in best[k_class] if i == int(picture[j]) and p == int(position[j])]
        assert chosen == [top_share]


def test_with_the_cosine_distance_nearest_means_nearest_in_angle():
    """Planted class parts at random lengths: with ``distance="cosine"`` scaling every patch of a
    picture changes nothing about which patch is chosen (only the angle counts), and the chosen
    prototype is still exactly the (scaled) patch."""
    z, labels, cells = planted(seed=2)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    scale = torch.linspace(0.2, 5.0, z.shape[0]).view(-1, 1, 1, 1)
    _, picture, position = distinctive_patches(z, labels, classes, (1, 1), neighbours=3, distance="cosine")
    prototypes, picture_s, position_s = distinctive_patches(z * scale, labels, classes, (1, 1), neighbours=3, distance="cosine")
    assert torch.equal(picture, picture_s) and torch.equal(position, position_s)
    for j in range(6):
        r, c = divmod(int(position_s[j]), 5)
        torch.testing.assert_close(prototypes[j, :, 0, 0], (z * scale)[picture_s[j], :, r, c])
    with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
        distinctive_patches(z, labels, classes, (1, 1), distance="manhattan")


def test_a_class_without_pictures_is_refused():
    z, labels, _ = planted(num_classes=2)
    with pytest.raises(ValueError, match="class 2 has no sampled training picture"):
        distinctive_patches(z, labels, torch.tensor([0, 1, 2]), (1, 1))


def test_a_run_with_distinctive_init_starts_from_real_training_patches(tmp_path):
    """In a run, the prototypes before the first epoch are latent patches of training pictures
    of their own class (recomputed here with the untrained model)."""
    config = {
        "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8,
                  "prototype_init": "distinctive"},
        "data": {"root": "synthetic", "image_size": 32, "augment": False, "val_fraction": 0.2, "batch_size": 8,
                 "synthetic_classes": 3, "synthetic_train_per_class": 6, "synthetic_test_per_class": 2},
        "schedule": {"epochs": 1, "warm_epochs": 1, "push_start": 1, "push_at_end": False},
        "run": {"seed": 0, "device": "cpu", "threads": 1},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    trainer = Trainer(load_config(path), tmp_path / "run")
    trainer._initialise_prototypes()
    model, data = trainer.model.eval(), trainer.data
    with torch.no_grad():
        for j in range(model.num_prototypes):
            k = int(model.prototype_classes[j])
            own = [i for i in data.train_indices if data.clean.targets[i] == k]
            z = model.latent(torch.stack([data.clean[i][0] for i in own]))
            d = ((latent_patches(z, (1, 1)) - model.prototypes[j].flatten()) ** 2).sum(-1)  # (N, P)
            assert float(d.min()) < 1e-8


# -- schedule.restart: prototypes pruning would remove start again on distinctive patches --------

def synthetic_model_and_data(seed=0):
    from protopnet.data.synthetic import SyntheticParts

    model = tiny_model(seed=seed).eval()
    data = SyntheticParts("train", num_classes=3, images_per_class=6, image_size=32, seed=seed)
    return model, data


def test_restarted_prototypes_become_own_class_patches_others_unchanged():
    from protopnet.runtime import RunSettings
    from protopnet.train.prototype_init import restart_on_distinctive_patches

    model, data = synthetic_model_and_data()
    before = model.prototypes.detach().clone()
    with torch.no_grad():
        model.last_layer.weight.uniform_(-3, 3)
    weights = model.last_layer.weight.detach().clone()
    which = [0, 3]
    chosen = restart_on_distinctive_patches(model, data, list(range(len(data))), which, seed=1, settings=RunSettings(batch_size=8))
    assert len(chosen) == 2
    with torch.no_grad():
        for j, (index, position) in zip(which, chosen):
            assert data.targets[index] == int(model.prototype_classes[j])  # a picture of its own class
            z = model.latent(data[index][0][None])  # (1, D, H, W)
            patch = latent_patches(z, (1, 1))[0, position]
            assert torch.allclose(model.prototypes[j].flatten(), patch, atol=1e-6)  # exactly that patch
            column = torch.full((3,), -0.5)
            column[int(model.prototype_classes[j])] = 1.0
            assert torch.equal(model.last_layer.weight[:, j], column)  # the paper's initial connection
    others = [j for j in range(model.num_prototypes) if j not in which]
    assert torch.equal(model.prototypes[others], before[others])
    assert torch.equal(model.last_layer.weight[:, others], weights[:, others])


def test_a_restart_skips_the_patch_another_prototype_of_its_class_holds():
    from protopnet.runtime import RunSettings
    from protopnet.train.prototype_init import restart_on_distinctive_patches

    model, data = synthetic_model_and_data()
    items = list(range(len(data)))
    settings = RunSettings(batch_size=8)
    assert int(model.prototype_classes[0]) == int(model.prototype_classes[1])
    (first,) = restart_on_distinctive_patches(model, data, items, [0], seed=1, settings=settings)
    grid = model.latent(data[0][0][None]).shape[-1]
    held = {"dataset_index": first[0], "position": list(divmod(first[1], grid))}
    model.provenance = [None, held, None, None, None, None]  # prototype 1 (same class) holds that patch
    (second,) = restart_on_distinctive_patches(model, data, items, [0], seed=1, settings=settings)
    assert second != first
    assert restart_on_distinctive_patches(model, data, items, [], seed=1, settings=settings) == []


def restart_run(tmp_path, restart=True, threshold=6):
    config = {
        "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8,
                  "prototype_init": "distinctive"},
        "data": {"root": "synthetic", "image_size": 32, "augment": False, "val_fraction": 0.2, "batch_size": 8,
                 "synthetic_classes": 3, "synthetic_train_per_class": 6, "synthetic_test_per_class": 2},
        "schedule": {"epochs": 3, "warm_epochs": 1, "push_start": 1, "push_every": 1, "last_layer_iterations": 2,
                     "restart": restart, "prune_k": 6, "prune_threshold": threshold},
        "run": {"seed": 0, "device": "cpu", "threads": 1},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    return Trainer(load_config(path), tmp_path / "run")


def test_a_run_restarts_after_every_push_but_the_last(tmp_path, monkeypatch):
    """With the strictest rule (all 6 nearest patches of its own class) prototypes restart after
    the pushes of epochs 1 and 2 but not after the final one; each restarted prototype is then
    exactly a training patch of its class (the push that follows moves it by nothing)."""
    import importlib

    steps = importlib.import_module("protopnet.train.prototype_steps")  # the Trainer's push and restart

    pushes = []
    real_push = steps.push_prototypes

    def recording_push(model, *args, **kwargs):
        provenance = real_push(model, *args, **kwargs)
        pushes.append([dict(p) for p in provenance])
        return provenance

    monkeypatch.setattr(steps, "push_prototypes", recording_push)
    trainer = restart_run(tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    push_records = [r for r in records if r["stage"] == "push"]
    assert [r["epoch"] for r in push_records] == [1, 2]
    assert "restarted" in push_records[0] and "restarted" not in push_records[1]
    events = [e for e in trainer.model.history if e.get("event") == "restart"]
    assert len(events) == 1 and len(events[0]["prototypes"]) == push_records[0]["restarted"] > 0
    # the push right after the restart: every restarted prototype is a real patch of its own class
    after_restart = pushes[1]
    for j in events[0]["prototypes"]:
        entry = after_restart[j]
        assert entry["distance"] < 1e-6
        assert trainer.data.clean.targets[entry["dataset_index"]] == entry["class_index"]
    assert len(pushes) == 3  # push, push again after the restart, the final push


def test_restart_with_a_single_push_says_it_does_nothing(tmp_path, caplog):
    """A schedule that pushes once (the demo config with fewer epochs, say) still trains; the
    restart, which never comes, is reported."""
    trainer = restart_run(tmp_path)
    trainer.config.schedule.push_start = 5
    import logging

    with caplog.at_level(logging.WARNING):
        Trainer(trainer.config, tmp_path / "again")
    assert "schedule.restart has no effect" in caplog.text
