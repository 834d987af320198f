"""ProtoPool's focal similarity as a cost (``loss.focal``): its value against a pair-by-pair
computation, where its gradient goes, the config's checks, and training with it."""

from __future__ import annotations

import math

import pytest
import torch

from protopnet.config import Config, ConfigError
from protopnet.losses import focal_cost
from protopnet.train import Trainer

from conftest import class_identity, tiny_config, tiny_data


def test_the_cost_is_min_minus_mean_over_own_class_pairs():
    g = torch.Generator().manual_seed(0)
    classes, k = [0, 0, 1, 2, 2], 3
    distances = torch.rand(6, len(classes), 4, 3, generator=g) * 2  # cosine distances lie in [0, 2]
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    terms = [
        float(distances[i, j].min() - distances[i, j].mean())
        for i in range(6)
        for j in range(len(classes))
        if classes[j] == int(labels[i])
    ]
    expected = sum(terms) / len(terms)
    assert focal_cost(distances, labels, class_identity(classes, k)).item() == pytest.approx(expected, rel=1e-6)
    assert expected < 0


def test_a_flat_map_costs_nothing_and_a_peaked_one_costs_less():
    identity = class_identity([0], 1)
    labels = torch.tensor([0])
    flat = torch.full((1, 1, 3, 3), 0.7)
    assert focal_cost(flat, labels, identity).item() == pytest.approx(0.0, abs=1e-7)
    peaked = flat.clone()
    peaked[0, 0, 1, 1] = 0.1
    assert focal_cost(peaked, labels, identity).item() < 0


def test_other_classes_prototypes_get_no_gradient_and_no_own_prototype_costs_zero():
    classes = [0, 1, 1]
    distances = torch.rand(2, 3, 3, 3, requires_grad=True)
    labels = torch.tensor([1, 1])
    focal_cost(distances, labels, class_identity(classes, 2)).backward()
    assert torch.all(distances.grad[:, 0] == 0)  # the class-0 prototype is not in either picture's class
    assert torch.any(distances.grad[:, 1:] != 0)
    # gradient of min - mean: the best cell is pulled closer, every cell pushed away by 1 / cells
    cells = 9
    grad = distances.grad[0, 1].flatten()
    best = int(distances[0, 1].flatten().argmin())
    assert grad[best].item() == pytest.approx((1 - 1 / cells) / 4)  # 4 own-class pairs
    others = torch.cat([grad[:best], grad[best + 1 :]])
    torch.testing.assert_close(others, torch.full_like(others, -1 / cells / 4))
    empty = focal_cost(torch.rand(2, 3, 3, 3), torch.tensor([2, 2]), class_identity(classes, 3))
    assert empty.item() == 0.0


def test_config_checks_the_focal_weight_and_the_distance():
    assert Config.from_dict({"model": {"distance": "cosine"}}, ["loss.focal=0.5"]).loss.focal == 0.5
    with pytest.raises(ConfigError, match="loss.focal: expected a weight >= 0"):
        Config.from_dict({"model": {"distance": "cosine"}}, ["loss.focal=-1"])
    with pytest.raises(ConfigError, match="loss.focal needs model.distance: cosine.*'l2'"):
        Config.from_dict({}, ["loss.focal=0.5"])
    assert Config.from_dict({}).loss.focal == 0.0  # off by default: the paper's objective


def test_training_with_the_cost_logs_it_and_sharpens_the_maps(tmp_path):
    def train(weight: float):
        config = tiny_config(tmp_path / str(weight), epochs=6, warm_epochs=2, push_start=99, push_at_end=False)
        config.model.distance = "cosine"
        config.loss.focal = weight
        trainer = Trainer(config.validate(), data=tiny_data())
        records = [trainer._train_epoch(step) for step in trainer.plan if step.stage in ("warm", "joint")]
        return trainer, records

    focal, records = train(10.0)
    plain, plain_records = train(0.0)
    assert all(math.isfinite(r["focal"]) and r["focal"] < 0 for r in records)  # warm-up and joint epochs
    assert all("focal" not in r for r in plain_records)
    data = tiny_data()
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor([int(data.train[i][1]) for i in range(len(data.train))])

    def contrast(trainer) -> float:
        trainer.model.eval()
        with torch.no_grad():
            return -float(focal_cost(trainer.model(images).distances, labels, trainer.model.class_identity))

    sharp, flat = contrast(focal), contrast(plain)
    assert sharp > 1.5 * flat, (sharp, flat)
