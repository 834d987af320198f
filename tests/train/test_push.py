"""Push: every prototype becomes the nearest latent patch of its own class (brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protopnet.train.push import push_prototypes

from conftest import ColourDataset, tiny_model


def all_latents(model, dataset):
    model.eval()
    with torch.no_grad():
        images = torch.stack([dataset.to_tensor(dataset.load_image(i)) for i in range(len(dataset))])
        return model.latent(images)  # (N, D, H, W)


@pytest.mark.parametrize("size", [(1, 1), (2, 2)])
def test_push_projects_onto_the_nearest_patch_of_the_own_class(size):
    data = ColourDataset(num_classes=3, per_class=5)
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_size=size)
    before = model.prototypes.detach().clone()
    z = all_latents(model, data)
    h, w = size
    provenance = push_prototypes(model, data, batch_size=4)
    labels = torch.tensor(data.targets)
    for j, entry in enumerate(provenance):
        k = int(model.prototype_classes[j])
        # brute force over every patch of every image of class k
        best, where = float("inf"), None
        for i in torch.nonzero(labels == k).flatten().tolist():
            for y in range(z.shape[2] - h + 1):
                for x in range(z.shape[3] - w + 1):
                    d = float(((z[i, :, y : y + h, x : x + w] - before[j]) ** 2).sum())
                    if d < best - 1e-6:
                        best, where = d, (i, y, x)
        i, y, x = where
        assert entry["dataset_index"] == i and entry["position"] == [y, x]
        assert data.targets[entry["dataset_index"]] == k == entry["class_index"]
        torch.testing.assert_close(model.prototypes[j], z[i, :, y : y + h, x : x + w])
        assert entry["distance"] == pytest.approx(best, rel=1e-4, abs=1e-4)
        assert entry["path"] == data.path(i)
        x0, y0, x1, y1 = entry["box"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        assert len(entry["activation"]) == z.shape[2] - h + 1


def test_push_does_not_depend_on_the_batch_size():
    data = ColourDataset(num_classes=3, per_class=4)
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    pa = push_prototypes(a, data, batch_size=1)
    pb = push_prototypes(b, data, batch_size=12)
    assert [(p["dataset_index"], p["position"]) for p in pa] == [(p["dataset_index"], p["position"]) for p in pb]
    torch.testing.assert_close(a.prototypes, b.prototypes)


def test_after_push_each_prototype_is_exactly_at_distance_zero_on_its_source():
    data = ColourDataset(num_classes=2, per_class=4)
    model = tiny_model(num_classes=2).eval()
    provenance = push_prototypes(model, data, batch_size=3)
    for entry in provenance:
        image = data.to_tensor(data.load_image(entry["dataset_index"]))[None]
        out = model(image)
        assert out.min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=1e-4)
        # the recorded activation map peaks at the recorded patch
        act = torch.tensor(entry["activation"])
        assert act.flatten().argmax().item() == entry["position"][0] * act.shape[1] + entry["position"][1]


def test_push_box_is_the_95th_percentile_region():
    from protopnet.regions import upsample_activation

    data = ColourDataset(num_classes=2, per_class=3, image_size=64)
    model = tiny_model(num_classes=2)
    model.image_size = 64
    for entry in push_prototypes(model, data):
        up = upsample_activation(entry["activation"], (64, 64))
        mask = up >= np.percentile(up, 95)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # the smallest box enclosing every pixel at or above the 95th percentile
        assert entry["box"] == [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
        assert mask.mean() >= 0.05
        x0, y0, x1, y1 = entry["box"]
        assert mask[y0:y1, x0:x1].sum() == mask.sum()


def test_push_refuses_a_class_without_images():
    data = ColourDataset(num_classes=3, per_class=2)
    model = tiny_model(num_classes=3)
    only_two_classes = [i for i, t in enumerate(data.targets) if t != 2]
    with pytest.raises(ValueError, match="colour_2|class_2"):
        push_prototypes(model, data, indices=only_two_classes)
