"""Backbones at output stride 16: the same network, a latent grid twice as fine.

The atrous conversion (stride removed, later convolutions dilated) computes, at the even
positions of its finer map, exactly the coarser map of the original network with the same
weights: that is what makes the pretrained weights valid for it."""

from __future__ import annotations

import pytest
import torch

from protopnet.model import ProtoPNet
from protopnet.model.backbones import build_backbone


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_the_stride16_map_holds_the_stride32_map_at_its_even_cells(name, torch_home, monkeypatch):
    torch.manual_seed(0)
    # ImageNet weights where the shared checkpoint is (an untrained MobileNetV2's output is ~1e-8)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    coarse = build_backbone(name, pretrained=name == "mobilenet_v2")
    fine = build_backbone(f"{name}_stride16", pretrained=False)
    fine.module.load_state_dict(coarse.module.state_dict())  # same weights, other strides
    assert (coarse.stride, fine.stride) == (32, 16) and coarse.out_channels == fine.out_channels
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a = coarse.module.eval()(x)
        b = fine.module.eval()(x)
    assert a.shape[-2:] == (3, 3) and b.shape[-2:] == (6, 6)
    torch.testing.assert_close(b[..., ::2, ::2], a, atol=1e-4, rtol=1e-4)
    assert float(a.abs().mean()) > 1e-2  # a real signal, not vanishing activations
    assert not torch.allclose(b[..., 1::2, ::2], a, atol=1e-3)  # the odd cells are new positions


def test_a_protopnet_on_the_finer_grid():
    model = ProtoPNet(backbone="mobilenet_v2_stride16", num_classes=3, prototypes_per_class=2, prototype_dim=16, pretrained=False)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.distances.shape == (1, 6, 14, 14) and model.stride == 16
