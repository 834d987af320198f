"""The diversity cost (``loss.diversity``): its value against a pair-by-pair computation, which
pairs it touches and which way its gradient moves them, the config's checks, and training with
it keeping a class's prototypes apart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protopnet.config import Config, ConfigError
from protopnet.losses import diversity_cost
from protopnet.train import Trainer

from conftest import class_identity, tiny_config, tiny_data


def test_the_cost_is_the_squared_excess_over_same_class_pairs_per_class():
    g = torch.Generator().manual_seed(0)
    classes, k, margin = [0, 0, 0, 1, 2, 2], 3, 0.1
    prototypes = torch.randn(len(classes), 4, 1, 1, generator=g)
    prototypes[1] = prototypes[0] + 0.1  # a near copy: the pair must cost
    expected = 0.0
    for j in range(len(classes)):
        for l in range(j + 1, len(classes)):
            if classes[j] == classes[l]:
                cos = float(F.cosine_similarity(prototypes[j].flatten(), prototypes[l].flatten(), dim=0))
                expected += max(cos - margin, 0.0) ** 2
    expected /= k
    assert expected > 0
    cost = diversity_cost(prototypes, class_identity(classes, k), margin)
    assert cost.item() == pytest.approx(expected, rel=1e-5)


def test_pairs_within_the_margin_and_copies_in_other_classes_cost_nothing():
    identity = class_identity([0, 0, 1], 2)
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])  # orthogonal: cosine 0
    assert diversity_cost(torch.stack([a, b, a]), identity, 0.5).item() == 0.0  # prototype 2 copies 0, other class
    copies = torch.stack([a, 3 * a, b])  # same direction, another length: cosine 1
    assert diversity_cost(copies, identity, 0.5).item() == pytest.approx(0.25 / 2)  # (1 - 0.5)^2 over 2 classes


def test_the_gradient_moves_a_close_pair_apart_and_leaves_the_rest():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, generator=g)
    prototypes = torch.stack([base, base + 0.2 * torch.randn(8, generator=g), torch.randn(8, generator=g), base]).requires_grad_()
    identity = class_identity([0, 0, 0, 1], 2)  # prototype 3 copies 0 but is of class 1
    diversity_cost(prototypes, identity, 0.3).backward()
    assert torch.all(prototypes.grad[3] == 0)
    with torch.no_grad():
        stepped = prototypes - 0.1 * prototypes.grad
    before = F.cosine_similarity(prototypes[0], prototypes[1], dim=0)
    after = F.cosine_similarity(stepped[0], stepped[1], dim=0)
    assert after < before - 1e-3


def test_config_checks_the_weight_and_the_margin():
    config = Config.from_dict({}, ["loss.diversity=0.2", "loss.diversity_margin=0.8"])
    assert (config.loss.diversity, config.loss.diversity_margin) == (0.2, 0.8)
    assert Config.from_dict({}).loss.diversity == 0.0  # off by default: the paper's objective
    with pytest.raises(ConfigError, match=r"loss.diversity: expected a weight >= 0.*-1"):
        Config.from_dict({}, ["loss.diversity=-1"])
    with pytest.raises(ConfigError, match=r"loss.diversity_margin: expected a cosine similarity in \[-1, 1\), got 1.0"):
        Config.from_dict({}, ["loss.diversity_margin=1.0"])
    with pytest.raises(ValueError, match="diversity margin 2"):
        diversity_cost(torch.rand(2, 3), class_identity([0, 0], 1), 2)


def _largest_same_class_cosine(trainer: Trainer) -> float:
    unit = F.normalize(trainer.model.prototypes.detach().flatten(1), dim=1)
    cosine = unit @ unit.t()
    classes = trainer.model.prototype_classes
    same = (classes[:, None] == classes[None, :]) & ~torch.eye(len(classes), dtype=torch.bool)
    return float(cosine[same].max())


def test_training_with_the_cost_logs_it_and_keeps_copies_apart(tmp_path):
    def train(weight: float):
        config = tiny_config(tmp_path / str(weight), optim={"warm_prototypes_lr": 0.05, "prototypes_lr": 0.05}, epochs=6, warm_epochs=3, push_start=99, push_at_end=False)
        config.loss.diversity = weight
        trainer = Trainer(config.validate(), data=tiny_data())
        with torch.no_grad():  # every class starts with its two prototypes close together
            p = trainer.model.prototypes
            for j in range(1, p.shape[0], 2):
                p[j] = p[j - 1] + 0.05 * torch.randn_like(p[j - 1])
        start = _largest_same_class_cosine(trainer)
        records = [trainer._train_epoch(step) for step in trainer.plan if step.stage in ("warm", "joint")]
        return trainer, records, start

    apart, records, start = train(5.0)
    plain, plain_records, _ = train(0.0)
    assert start > 0.98
    assert all(math.isfinite(r["diversity"]) and r["diversity"] >= 0 for r in records)  # warm-up and joint epochs
    assert records[-1]["diversity"] < records[0]["diversity"]
    assert all("diversity" not in r for r in plain_records)
    assert _largest_same_class_cosine(apart) < 0.75  # measured 0.47
    assert _largest_same_class_cosine(plain) > 0.9  # without it the pair stays together (0.94)
