"""Stability training (``loss.stability``, Zheng et al. 2016): the cost against a pair-by-pair
computation and its invariances, the noisy copies the feature cache keeps (against running the
frozen layers on the noisy pictures), the config's checks, and training with it."""

from __future__ import annotations

import math

import pytest
import torch

from protopnet.config import Config, ConfigError
from protopnet.interpretability.parts import perturbation
from protopnet.losses import stability_cost
from protopnet.train import Trainer
from protopnet.train.feature_cache import FrozenFeatureCache, split_backbone, training_noise

from conftest import class_identity, tiny_config, tiny_data, tiny_model


def test_the_cost_is_the_maps_noise_to_signal_ratio_over_own_class_pairs():
    g = torch.Generator().manual_seed(0)
    classes, k = [0, 0, 1, 2, 2], 3
    clean = torch.rand(6, len(classes), 4, 3, generator=g) * 2
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    terms = []
    for i in range(6):
        for j in range(len(classes)):
            if classes[j] == int(labels[i]):
                c, n = clean[i, j].flatten().double(), noisy[i, j].flatten().double()
                terms.append(float(((n - c) ** 2).sum() / ((c - c.mean()) ** 2).sum()))
    expected = sum(terms) / len(terms)
    assert stability_cost(clean, noisy, labels, class_identity(classes, k)).item() == pytest.approx(expected, rel=1e-5)


def test_the_cost_is_zero_for_unchanged_maps_scale_free_and_ignores_other_classes():
    g = torch.Generator().manual_seed(1)
    identity, labels = class_identity([0, 1], 2), torch.tensor([0, 0])
    clean = torch.rand(2, 2, 3, 3, generator=g)
    assert stability_cost(clean, clean.clone(), labels, identity).item() == 0.0
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=g)
    cost = stability_cost(clean, noisy, labels, identity).item()
    assert cost > 0
    # a distance's scale and offset do not matter: the same maps x3 + 1 cost the same
    assert stability_cost(3 * clean + 1, 3 * noisy + 1, labels, identity).item() == pytest.approx(cost, rel=1e-5)
    # only prototype 0 is of the pictures' class: changing prototype 1's noisy map changes nothing
    other = noisy.clone()
    other[:, 1] += 5.0
    assert stability_cost(clean, other, labels, identity).item() == pytest.approx(cost, rel=1e-6)
    clean.requires_grad_(True)
    noisy = noisy.clone().requires_grad_(True)
    stability_cost(clean, noisy, labels, identity).backward()
    assert torch.all(noisy.grad[:, 1] == 0) and torch.any(noisy.grad[:, 0] != 0) and torch.any(clean.grad[:, 0] != 0)
    with pytest.raises(ValueError, match="differ in shape"):
        stability_cost(clean, noisy[:, :, :2], labels, identity)


def test_training_noise_is_fixed_per_item_clipped_and_never_the_metrics_noise():
    images = torch.zeros(3, 3, 16, 16)
    first = training_noise(images, torch.tensor([4, 5, 6]), 0.2, seed=0)
    again = training_noise(images[:1], torch.tensor([5]), 0.2, seed=0)
    torch.testing.assert_close(first[1:2], again)  # a pure function of (seed, item): batching does not matter
    assert first.abs().max().item() <= 0.25 + 1e-6 and 0.15 < first.std().item() < 0.2
    assert not torch.equal(first[0], training_noise(images[:1], torch.tensor([4]), 0.2, seed=1)[0])
    metric = perturbation((3, 16, 16), 0, 4, 0.2, 0.25)
    assert not torch.allclose(first[0], metric)


def test_the_cache_keeps_the_frozen_layers_output_of_each_noisy_picture():
    data = tiny_data()
    model = tiny_model(num_classes=len(data.train.classes)).eval()
    items = list(range(len(data.train)))
    plain = FrozenFeatureCache.build(model, 2, data.train, items, max_bytes=1e9, batch_size=5, device="cpu")
    cache = FrozenFeatureCache.build(model, 2, data.train, items, max_bytes=1e9, batch_size=5, device="cpu",
                                     noise_std=0.2, noise_seed=3)
    assert plain.noisy is None and cache.noisy is not None
    torch.testing.assert_close(cache.tensors, plain.tensors)  # the clean tensors do not change
    assert cache.nbytes == 2 * plain.nbytes
    prefix, suffix = split_backbone(model.features, 2)
    images = torch.stack([data.train[i][0] for i in items])
    with torch.no_grad():
        expected = prefix(images + training_noise(images, torch.tensor(items), 0.2, seed=3))
    torch.testing.assert_close(cache.noisy, expected, rtol=1e-4, atol=1e-5)
    whole = cache.extended(model, None, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(whole.noisy, model.features(images + training_noise(images, torch.tensor(items), 0.2, seed=3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(whole.tensors, model.features(images), rtol=1e-4, atol=1e-5)


def test_config_checks_the_weight_and_the_noise():
    assert Config.from_dict({}).loss.stability == 0.0  # off by default: the paper's objective
    config = Config.from_dict({}, ["loss.stability=2", "loss.stability_noise=0.1"])
    assert (config.loss.stability, config.loss.stability_noise) == (2.0, 0.1)
    with pytest.raises(ConfigError, match="loss.stability: expected a weight >= 0"):
        Config.from_dict({}, ["loss.stability=-1"])
    with pytest.raises(ConfigError, match=r"loss.stability_noise: expected a standard deviation in \(0, 1\]"):
        Config.from_dict({}, ["loss.stability_noise=0"])


@pytest.mark.parametrize("feature_cache", [False, True])
def test_training_with_the_cost_logs_it_and_steadies_the_maps(tmp_path, feature_cache):
    data = tiny_data()
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor([int(data.train[i][1]) for i in range(len(data.train))])
    noise = training_noise(images, torch.arange(len(images)) + 1000, 0.2, seed=9)  # noise training never saw

    def train(weight: float):
        config = tiny_config(tmp_path / f"{weight}-{feature_cache}", epochs=6, warm_epochs=2, push_start=99, push_at_end=False)
        config.loss.stability = weight
        config.data.feature_cache = feature_cache
        config.schedule.frozen_backbone_blocks = 2 if feature_cache else 0
        config.schedule.freeze_backbone_batchnorm = True  # running statistics: train and eval passes compute alike
        trainer = Trainer(config.validate(), data=tiny_data())
        records = [trainer._train_epoch(step) for step in trainer.plan if step.stage in ("warm", "joint")]
        return trainer, records

    def ratio(trainer) -> float:
        trainer.model.eval()
        with torch.no_grad():
            return float(stability_cost(trainer.model(images).distances, trainer.model(images + noise).distances, labels, trainer.model.class_identity))

    steady, records = train(20.0)
    plain, plain_records = train(0.0)
    assert all(math.isfinite(r["stability"]) and r["stability"] > 0 for r in records)  # warm-up and joint epochs
    assert all("stability" not in r for r in plain_records)
    assert ratio(steady) < 0.5 * ratio(plain), (ratio(steady), ratio(plain))
