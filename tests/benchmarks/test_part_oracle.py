"""benchmarks/part_oracle.py: the oracle part prototypes, scored by the consistency metric."""

from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark


def _oracle_module():
    return load_benchmark("part_oracle")


def _pictures(n: int, seed: int):
    """Two classes of 7 x 7 feature maps at 224 px. Every cell is background ``(1.5, 0.5)``
    except the part's cell, somewhere in the lower-right quadrant: ``(s, 0)``, with ``s`` 0.2 in
    half the pictures and 5 in the other half. The part's point is that cell's centre."""
    g = torch.Generator().manual_seed(seed)
    features = torch.tensor([1.5, 0.5]).view(1, 2, 1, 1).repeat(2 * n, 1, 7, 7)
    points = torch.zeros(2 * n, 1, 2)
    for i in range(2 * n):
        r, c = (int(v) for v in torch.randint(4, 7, (2,), generator=g))
        features[i, :, r, c] = torch.tensor([0.2 if i % 2 else 5.0, 0.0])
        points[i, 0] = torch.tensor([c * 32 + 16.0, r * 32 + 16.0])
    labels = torch.arange(2).repeat_interleave(n)
    return features, points, torch.ones(2 * n, 1, dtype=torch.bool), labels


def test_the_oracle_finds_a_part_by_direction_and_l2_is_misled_by_its_length():
    """The part's mean vector (2.6, 0) is nearer in L2 to the background (1.5, 0.5) than to the
    part itself, short (0.2, 0) or long (5, 0): L2 never peaks on the part; the cosine finds the
    part's direction in every picture."""
    oracle = _oracle_module()
    train, test = _pictures(10, seed=0), _pictures(10, seed=1)
    cosine = oracle.oracle_consistency(*train, *test, image_size=224, distance="cosine")
    l2 = oracle.oracle_consistency(*train, *test, image_size=224, distance="l2")
    assert cosine == {"consistency": 1.0, "own_part_frequency": 1.0, "prototypes": 2}
    assert l2["consistency"] == 0.0 and l2["own_part_frequency"] == 0.0


def test_the_oracle_needs_enough_pictures_showing_a_part():
    oracle = _oracle_module()
    features, points, visible, labels = _pictures(3, seed=0)
    with pytest.raises(ValueError, match="5 training pictures"):
        oracle.oracle_consistency(features, points, visible, labels, features, points, visible, labels, image_size=224)


def test_the_command_runs_on_a_trained_model(tmp_path, capsys):
    """End to end on the synthetic data (its class glyph is the one part): a table row per layer."""
    from conftest import tiny_model
    from protopnet import save_model

    model = tiny_model(num_classes=10, prototypes_per_class=1)
    model.image_size = 64
    save_model(model, tmp_path / "m")
    assert _oracle_module().main(["--data", "synthetic", "--model", str(tmp_path / "m"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| consistency (l2) | consistency (cosine) |" in out and "latent | 8 x 8 | 8 |" in out
