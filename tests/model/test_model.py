"""The network against the paper's equations and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from protopnet import ProtoPNet
from protopnet.model import available_backbones, cosine_distance_maps, l2_distance_maps, similarity
from protopnet.model.backbones import build_backbone
from protopnet.model.distances import paired_cosine_distance_maps, paired_l2_distance_maps

from conftest import tiny_model


def _squared_l2(patch: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    return ((patch - prototype) ** 2).sum()


def _one_minus_cosine(patch: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(patch.flatten(), prototype.flatten(), dim=0)


def brute_force_distances(z: torch.Tensor, prototypes: torch.Tensor, metric=_squared_l2) -> torch.Tensor:
    """``metric(patch, p)`` (default ||patch - p||^2) for every prototype and patch position,
    by explicit loops in float64."""
    b, d, H, W = z.shape
    m, _, h, w = prototypes.shape
    out = torch.empty(b, m, H - h + 1, W - w + 1, dtype=torch.float64)
    for i in range(b):
        for j in range(m):
            for y in range(H - h + 1):
                for x in range(W - w + 1):
                    out[i, j, y, x] = metric(z[i, :, y : y + h, x : x + w].double(), prototypes[j].double())
    return out


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 2)])
def test_distances_match_brute_force(size):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(2, 5, 6, 7, generator=g)
    prototypes = torch.rand(4, 5, *size, generator=g)
    fast = l2_distance_maps(z, prototypes)
    assert fast.shape == (2, 4, 6 - size[0] + 1, 7 - size[1] + 1)
    torch.testing.assert_close(fast.double(), brute_force_distances(z, prototypes), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 2)])
def test_paired_distances_are_the_diagonal_of_brute_force(size):
    """Prototype j against latent map j only (push's activation maps), for every j at once."""
    g = torch.Generator().manual_seed(1)
    z = torch.rand(4, 5, 6, 7, generator=g)
    prototypes = torch.rand(4, 5, *size, generator=g)
    paired = paired_l2_distance_maps(z, prototypes)
    assert paired.shape == (4, 6 - size[0] + 1, 7 - size[1] + 1) and paired.dtype == torch.float32
    full = brute_force_distances(z, prototypes)  # (4, 4, H', W'): every map against every prototype
    torch.testing.assert_close(paired.double(), torch.stack([full[j, j] for j in range(4)]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected z"):
        paired_l2_distance_maps(z, prototypes[:3])


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 2)])
def test_cosine_distances_match_brute_force(size):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 6, 7, generator=g)  # signed, so distances span [0, 2]
    prototypes = torch.randn(4, 5, *size, generator=g)
    fast = cosine_distance_maps(z, prototypes)
    assert fast.shape == (2, 4, 6 - size[0] + 1, 7 - size[1] + 1) and fast.dtype == torch.float32
    full = brute_force_distances(z, prototypes, _one_minus_cosine)
    torch.testing.assert_close(fast.double(), full, atol=1e-5, rtol=1e-5)
    paired = paired_cosine_distance_maps(z[[0, 1, 0, 1]], prototypes)
    torch.testing.assert_close(paired.double(), torch.stack([full[j % 2, j] for j in range(4)]), atol=1e-5, rtol=1e-5)


def test_cosine_distance_ignores_the_patch_norm_and_is_zero_on_a_copied_patch():
    """Scaling a patch changes its L2 distance to a prototype but not its cosine distance; the
    prototype copied from a patch is at distance 0 there, and an all-zero patch is at 1."""
    g = torch.Generator().manual_seed(3)
    z = torch.rand(1, 6, 4, 4, generator=g)
    z[0, :, 3, 3] = 0
    prototypes = z[:, :, 1:2, 2:3].clone()
    scaled = z.clone()
    scaled[0, :, 0, 0] *= 7.0
    d, d_scaled = cosine_distance_maps(z, prototypes), cosine_distance_maps(scaled, prototypes)
    assert d[0, 0, 1, 2] == pytest.approx(0.0, abs=1e-6)
    assert d_scaled[0, 0, 0, 0] == pytest.approx(float(d[0, 0, 0, 0]), abs=1e-6)
    assert l2_distance_maps(scaled, prototypes)[0, 0, 0, 0] != pytest.approx(float(l2_distance_maps(z, prototypes)[0, 0, 0, 0]))
    assert d[0, 0, 3, 3] == pytest.approx(1.0) and torch.isfinite(d).all()


def test_a_cosine_model_uses_cosine_distances_everywhere():
    """forward, distances to given prototypes and the paired maps push draws all measure the angle."""
    model = tiny_model(num_classes=2, prototypes_per_class=2, distance="cosine").eval()
    x = torch.randn(2, 3, 32, 32)
    z = model.latent(x)
    out = model(x)
    torch.testing.assert_close(out.distances, cosine_distance_maps(z, model.prototypes))
    torch.testing.assert_close(model.distances(z, model.prototypes[:1]), cosine_distance_maps(z, model.prototypes[:1]))
    torch.testing.assert_close(model.paired_distances(z[[0, 1, 0, 1]], model.prototypes), paired_cosine_distance_maps(z[[0, 1, 0, 1]], model.prototypes))
    assert model.config()["distance"] == "cosine" and "distance='cosine'" in repr(model)
    with pytest.raises(ValueError, match="unknown distance 'dot'"):
        tiny_model(distance="dot")


def test_distances_are_clamped_at_zero_and_exact_on_a_copied_patch():
    z = torch.rand(1, 8, 4, 4) * 50  # large values: cancellation would go negative
    prototypes = z[:, :, 1:2, 2:3].clone()  # exactly the patch at (1, 2)
    d = l2_distance_maps(z, prototypes)
    assert (d >= 0).all()
    assert d[0, 0, 1, 2] == pytest.approx(0.0, abs=1e-2)
    assert d[0, 0].flatten().argmin() == 1 * 4 + 2


def test_distances_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="channels"):
        l2_distance_maps(torch.rand(1, 4, 3, 3), torch.rand(2, 5, 1, 1))
    with pytest.raises(ValueError, match="larger than the latent map"):
        l2_distance_maps(torch.rand(1, 4, 3, 3), torch.rand(2, 4, 4, 1))


def test_similarity_formulas():
    d = torch.tensor([0.0, 0.5, 3.0])
    eps = 1e-4
    expected = torch.tensor([math.log((v + 1) / (v + eps)) for v in d.tolist()])
    torch.testing.assert_close(similarity(d, "log", eps), expected)
    torch.testing.assert_close(similarity(d, "linear"), -d)
    assert torch.all(similarity(d, "log")[:-1] > similarity(d, "log")[1:]), "log activation must decrease with distance"
    with pytest.raises(ValueError, match="log"):
        similarity(d, "cosine")


def test_last_layer_initialisation():
    model = tiny_model(num_classes=4, prototypes_per_class=3)
    w = model.last_layer.weight
    assert w.shape == (4, 12) and model.last_layer.bias is None
    for k in range(4):
        for j in range(12):
            assert w[k, j].item() == (1.0 if j // 3 == k else -0.5)
    assert model.prototype_classes.tolist() == [k for k in range(4) for _ in range(3)]


@pytest.mark.parametrize("activation", ["log", "linear"])
def test_forward_is_the_composition_of_its_parts(activation):
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_size=(2, 2), activation=activation).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    z = model.latent(x)
    assert z.shape == (3, 8, 4, 4)
    assert out.distances.shape == (3, 6, 3, 3)
    torch.testing.assert_close(out.min_distances, out.distances.flatten(2).min(2).values)
    torch.testing.assert_close(out.similarities, similarity(out.min_distances, activation, 1e-4))
    torch.testing.assert_close(out.logits, out.similarities @ model.last_layer.weight.t())
    assert ((z >= 0) & (z <= 1)).all(), "the add-on ends in a sigmoid"


def test_add_on_layers():
    regular = tiny_model(prototype_dim=16)
    convs = [m for m in regular.add_on if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 16), (16, 16)]
    assert isinstance(regular.add_on[-1], torch.nn.Sigmoid) and isinstance(regular.add_on[1], torch.nn.ReLU)
    bottleneck = tiny_model(prototype_dim=16, add_on="bottleneck")
    convs = [m for m in bottleneck.add_on if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16)]
    assert isinstance(bottleneck.add_on[-1], torch.nn.Sigmoid)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in bottleneck.add_on) == 1


def test_add_on_none_puts_the_prototypes_in_the_backbones_own_space():
    model = tiny_model(prototype_dim=128, add_on="none").eval()
    assert len(model.add_on) == 0 and model.prototypes.shape[1] == 128
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.latent(x), model.features(x))
    out = model(x)
    torch.testing.assert_close(out.distances, brute_force_distances(model.features(x), model.prototypes.detach()).float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prototype_dim must be 128, got 16"):
        tiny_model(prototype_dim=16, add_on="none")


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        ProtoPNet(backbone="resnet9", num_classes=2, pretrained=False)
    with pytest.raises(ValueError, match="activation"):
        tiny_model(activation="relu")
    with pytest.raises(ValueError, match="add_on"):
        tiny_model(add_on="wide")
    with pytest.raises(ValueError, match="class_names"):
        tiny_model(num_classes=3, class_names=["a", "b"])


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("mobilenet_v2", 1280), ("vgg11", 512)])
def test_torchvision_backbones_give_the_documented_feature_maps(name, channels):
    built = build_backbone(name, pretrained=False)
    with torch.no_grad():
        y = built.module.eval()(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, channels, 7, 7) and built.out_channels == channels


def test_every_paper_backbone_is_registered():
    for name in ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "resnet18",
                 "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "densenet161", "densenet169",
                 "densenet201", "mobilenet_v2"]:
        assert name in available_backbones()


def test_pretrained_weights_load_offline_through_torchvision(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    model = ProtoPNet(backbone="mobilenet_v2", num_classes=2, prototypes_per_class=1, pretrained=True)
    reference = torch.load(torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth", weights_only=True)
    torch.testing.assert_close(model.features[0][0].weight, reference["features.0.0.weight"])


@pytest.mark.parametrize("name, stride, field", [("tiny_cnn", 8, 26), ("tiny_cnn_rf14", 8, 14)])
def test_tiny_cnn_grid_receptive_field_and_cell_centres(name, stride, field):
    """The latent cell (i, j) sees a field-pixel square centred where bicubic upsampling
    (align_corners=False) puts the cell: pixel stride * j + (stride - 1) / 2. (BatchNorm in eval
    mode; GroupNorm's statistics would make every cell depend on the whole image.)"""
    from protopnet.model.backbones import build_backbone

    built = build_backbone(name, pretrained=False)
    net = built.module.eval()
    assert built.stride == stride and net.receptive_field == field
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 128, 64 // stride, 64 // stride)
    i = j = 64 // stride // 2
    out[0, :, i, j].sum().backward()
    seen = x.grad.abs().sum(dim=(0, 1)) > 0  # (64, 64)
    rows, cols = torch.nonzero(seen.any(1)).flatten(), torch.nonzero(seen.any(0)).flatten()
    assert int(rows[-1] - rows[0]) + 1 == field and int(cols[-1] - cols[0]) + 1 == field
    assert (float(rows[0] + rows[-1]) / 2, float(cols[0] + cols[-1]) / 2) == (stride * i + (stride - 1) / 2, stride * j + (stride - 1) / 2)
