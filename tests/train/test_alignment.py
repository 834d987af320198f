"""The shallow-deep alignment cost (``loss.alignment``, Huang et al. ICCV 2023): its value against
a cell-by-cell computation, its gradients, the blocks it reads, and training with it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protopnet.config import Config, ConfigError
from protopnet.losses import alignment_cost, to_latent_grid
from protopnet.model import ProtoPNet
from protopnet.train import Trainer
from protopnet.train.alignment import AlignmentTaps, block_sides, resolve_alignment_block
from protopnet.train.stages import backbone_blocks

from conftest import tiny_config, tiny_data


def identity(classes: list[int], k: int) -> torch.Tensor:
    eye = torch.zeros(len(classes), k)
    eye[torch.arange(len(classes)), torch.tensor(classes)] = 1
    return eye


def cell_by_cell(distances, labels, classes, shallow_grid, deep, threshold):
    """The cost written out: for each image and each prototype of its class, the closest cell p;
    for every cell q, |cos(deep_p, deep_q) - cos(shallow_p, shallow_q)| beyond the threshold."""
    b, m, h, w = distances.shape
    terms = []
    for i in range(b):
        for j in range(m):
            if classes[j] != int(labels[i]):
                continue
            p = int(distances[i, j].flatten().argmin())
            dp, sp = deep[i].flatten(1)[:, p], shallow_grid[i].flatten(1)[:, p]
            row = []
            for q in range(h * w):
                dq, sq = deep[i].flatten(1)[:, q], shallow_grid[i].flatten(1)[:, q]
                gap = abs(float(F.cosine_similarity(dp, dq, dim=0)) - float(F.cosine_similarity(sp, sq, dim=0)))
                row.append(max(gap - threshold, 0.0))
            terms.append(sum(row) / len(row))
    return sum(terms) / len(terms)


def random_inputs(seed=0, b=4, classes=(0, 0, 1, 1, 2), k=3, h=3, w=3):
    g = torch.Generator().manual_seed(seed)
    distances = torch.rand(b, len(classes), h, w, generator=g)
    labels = torch.randint(0, k, (b,), generator=g)
    shallow = torch.randn(b, 5, 2 * h, 2 * w, generator=g)
    deep = torch.randn(b, 7, h, w, generator=g)
    return distances, labels, list(classes), shallow, deep


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5])
def test_the_cost_matches_the_cell_by_cell_definition(threshold):
    distances, labels, classes, shallow, deep = random_inputs()
    got = alignment_cost(distances, labels, identity(classes, 3), shallow, deep, threshold)
    want = cell_by_cell(distances, labels, classes, F.pixel_unshuffle(shallow, 2), deep, threshold)
    assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-7)


def test_deep_features_that_keep_the_shallow_structure_cost_nothing():
    distances, labels, classes, shallow, _ = random_inputs(seed=1)
    deep = F.pixel_unshuffle(shallow, 2) * 3.0  # same cosines, other scale
    assert float(alignment_cost(distances, labels, identity(classes, 3), shallow, deep, 0.0)) < 1e-6
    # and a large enough tolerance forgives any difference (cosines differ by at most 2)
    _, _, _, _, other = random_inputs(seed=2)
    assert float(alignment_cost(distances, labels, identity(classes, 3), shallow, other, 2.0)) == 0.0
    assert float(alignment_cost(distances, labels, identity(classes, 3), shallow, other, 0.0)) > 0.1


def test_only_the_deep_features_learn_from_it():
    distances, labels, classes, shallow, deep = random_inputs(seed=3)
    distances.requires_grad_(True)
    shallow.requires_grad_(True)
    deep.requires_grad_(True)
    alignment_cost(distances, labels, identity(classes, 3), shallow, deep, 0.0).backward()
    assert deep.grad is not None and deep.grad.abs().sum() > 0
    assert shallow.grad is None  # a constant target
    assert distances.grad is None  # the peaks choose rows; they are not trained by this cost


def test_prototypes_of_other_classes_do_not_count():
    distances, labels, classes, shallow, deep = random_inputs(seed=4, b=3)
    labels = torch.tensor([0, 0, 1])
    eye = identity(classes, 3)
    before = alignment_cost(distances, labels, eye, shallow, deep, 0.0)
    moved = distances.clone()
    moved[:, 4] = torch.rand(3, 3, 3)  # prototype 4 is class 2: no image of class 2 here
    moved[:2, 2:4] = torch.rand(2, 2, 3, 3)  # class-1 prototypes on the class-0 images
    assert torch.equal(alignment_cost(moved, labels, eye, shallow, deep, 0.0), before)
    moved[0, 0] = torch.rand(3, 3)  # an own-class prototype's peak moves
    moved[0, 0, 0, 0] = -1.0
    assert not torch.equal(alignment_cost(moved, labels, eye, shallow, deep, 0.0), before)
    none_of_theirs = alignment_cost(distances, torch.tensor([2, 2, 2]), identity([0, 0, 1, 1, 1], 3), shallow, deep, 0.0)
    assert float(none_of_theirs) == 0.0  # no image has a prototype of its class


def test_shallow_cells_are_stacked_onto_the_latent_grid():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    grid = to_latent_grid(x, (2, 2))
    assert grid.shape == (2, 12, 2, 2)
    # the latent cell (1, 0) holds the shallow 2 x 2 block rows 2-3, columns 0-1 of every channel
    assert set(grid[0, :, 1, 0].tolist()) == set(x[0, :, 2:4, 0:2].flatten().tolist())
    assert to_latent_grid(x, (4, 4)) is x
    odd = to_latent_grid(x, (3, 3))  # sides that do not divide: averaged
    assert odd.shape == (2, 3, 3, 3)


def test_the_automatic_shallow_block_is_at_stride_eight():
    mobilenet = ProtoPNet(backbone="mobilenet_v2", num_classes=2, prototypes_per_class=1, pretrained=False)
    sides = block_sides(mobilenet.features, 224)
    assert sides[-1] == 7 and len(sides) == 19
    assert resolve_alignment_block(mobilenet.features, 224, None) == 6  # the last 28 px block
    resnet = ProtoPNet(backbone="resnet18", num_classes=2, prototypes_per_class=1, pretrained=False)
    block = resolve_alignment_block(resnet.features, 224, None)
    assert backbone_blocks(resnet.features)[block] is resnet.features.layer2  # stride 8, 28 px
    assert resolve_alignment_block(mobilenet.features, 224, 3) == 3
    with pytest.raises(ValueError, match="alignment_block: 18"):
        resolve_alignment_block(mobilenet.features, 224, 18)  # the last block is the deep feature itself


def test_the_taps_read_the_block_and_the_add_on_input():
    torch.manual_seed(0)
    model = ProtoPNet(backbone="tiny_cnn", num_classes=3, prototypes_per_class=2, prototype_dim=8, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = backbone_blocks(model.features)
    with torch.no_grad(), AlignmentTaps(model, 4, None) as taps:
        model(x)
        shallow, deep = taps.features(x)
        want_shallow = x
        for block in blocks[:5]:
            want_shallow = block(want_shallow)
        assert torch.equal(shallow, want_shallow)
        assert torch.equal(deep, model.features(x))
    model(x)  # hooks removed: nothing is kept any more
    assert taps._handles == [] and taps._deep is None
    with torch.no_grad(), AlignmentTaps(model, 4, None, deep="latent") as taps:
        model(x)
        _, latent = taps.features(x)
        assert torch.equal(latent, model.latent(x))  # the add-on's output, where the prototypes live
        assert latent.shape[1] == model.prototypes.shape[1] == 8
    with pytest.raises(ValueError, match="deep: expected 'backbone' or 'latent'"):
        AlignmentTaps(model, 4, None, deep="add_on")
    with pytest.raises(ValueError, match="inside the cached frozen blocks"):
        AlignmentTaps(model, 0, cached_blocks=3)


def test_config_rejects_bad_alignment_settings():
    with pytest.raises(ConfigError, match="loss.alignment:"):
        Config.from_dict({"loss": {"alignment": -1.0}})
    with pytest.raises(ConfigError, match="loss.alignment_threshold"):
        Config.from_dict({"loss": {"alignment_threshold": -0.1}})
    with pytest.raises(ConfigError, match="loss.alignment_block"):
        Config.from_dict({"loss": {"alignment_block": -2}})
    assert Config.from_dict({}, ["loss.alignment=0.5", "loss.alignment_block=3"]).loss.alignment_block == 3
    with pytest.raises(ConfigError, match="loss.alignment_deep: expected one of 'backbone', 'latent', got 'addon'"):
        Config.from_dict({"loss": {"alignment_deep": "addon"}})
    assert Config.from_dict({}).loss.alignment_deep == "backbone"  # Huang et al.'s choice stays the default


def _aligned_config(tmp_path, cached: bool, weight: float = 1.0, deep: str = "backbone"):
    config = tiny_config(tmp_path, epochs=3, warm_epochs=1, push_start=9, push_at_end=False, frozen_backbone_blocks=2)
    config.model.backbone = "tiny_cnn_gn"  # GroupNorm: frozen layers compute the same in train and eval mode
    config.data.feature_cache = cached
    config.loss.alignment = weight
    config.loss.alignment_block = 1  # the last cached block: with the cache, its output is the pass's input
    config.loss.alignment_deep = deep
    return config


def test_joint_epochs_train_with_the_cost_and_the_feature_cache_changes_nothing(tmp_path):
    weights, records = [], []
    for cached in (False, True):
        trainer = Trainer(_aligned_config(tmp_path / str(cached), cached), data=tiny_data())
        steps = [trainer._train_epoch(step) for step in trainer.plan if step.stage in ("warm", "joint")]
        records.append(steps)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for steps in records:
        assert "alignment" not in steps[0]  # warm-up: the backbone is frozen, the cost is off
        assert all(math.isfinite(s["alignment"]) and s["alignment"] > 0 for s in steps[1:])
    uncached, cached = weights
    for k in uncached:
        assert torch.allclose(uncached[k].float(), cached[k].float(), atol=1e-4, rtol=1e-4), k
    plain = Trainer(_aligned_config(tmp_path / "plain", False, weight=0.0), data=tiny_data())
    for step in plain.plan:
        if step.stage in ("warm", "joint"):
            record = plain._train_epoch(step)
            assert "alignment" not in record
    trained = plain.model.state_dict()
    assert any(not torch.allclose(trained[k].float(), uncached[k].float()) for k in trained if k.startswith("features"))


def test_aligning_the_latent_space_trains_the_add_on_towards_the_shallow_structure(tmp_path):
    """With ``alignment_deep: latent`` the cost is computed on the add-on layers' output: the
    joint epochs record it, and the trained add-on differs from the one aligned on the backbone's
    output (same seed, same data: only where the cost is read changed)."""
    trained = {}
    for deep in ("backbone", "latent"):
        trainer = Trainer(_aligned_config(tmp_path / deep, False, deep=deep), data=tiny_data())
        steps = [trainer._train_epoch(step) for step in trainer.plan if step.stage in ("warm", "joint")]
        assert all(math.isfinite(s["alignment"]) and s["alignment"] >= 0 for s in steps[1:])
        trained[deep] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert any(not torch.allclose(trained["backbone"][k].float(), trained["latent"][k].float()) for k in trained["latent"] if k.startswith("add_on"))
