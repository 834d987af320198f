"""The multi-scale backbone: its output stacks an earlier block's features onto the last block's,
and the training code can cut it where the feature cache cuts a backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protopnet.model.backbones import MultiScaleFeatures, build_backbone, multiscale_concat
from protopnet.train.feature_cache import split_backbone
from protopnet.train.stages import backbone_blocks


def _toy() -> MultiScaleFeatures:
    torch.manual_seed(0)
    blocks = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
    return MultiScaleFeatures(blocks, tap=1).eval()


def test_the_output_is_the_tapped_block_pooled_and_the_last_block_each_normalised():
    net = _toy()
    x = torch.randn(2, 3, 16, 16)
    shallow = net.blocks[1](net.blocks[0](x))  # (2, 6, 8, 8)
    deep = net.blocks[3](net.blocks[2](shallow))  # (2, 8, 4, 4)
    out = net(x)
    assert out.shape == (2, 14, 4, 4)
    scale = (14 / 2) ** 0.5
    torch.testing.assert_close(out[:, :6], F.normalize(F.avg_pool2d(shallow, 2), dim=1) * scale)
    torch.testing.assert_close(out[:, 6:], F.normalize(deep, dim=1) * scale)
    # both parts weigh the same in an angle: equal lengths in every cell
    torch.testing.assert_close(out[:, :6].norm(dim=1), out[:, 6:].norm(dim=1))
    torch.testing.assert_close(multiscale_concat(shallow, deep), out)


@pytest.mark.parametrize("frozen", [0, 1])
def test_cut_at_or_before_the_tap_computes_the_same_output(frozen):
    net = _toy()
    assert len(backbone_blocks(net)) == 4
    x = torch.randn(2, 3, 16, 16)
    prefix, suffix = split_backbone(net, frozen)
    torch.testing.assert_close(suffix(prefix(x)), net(x))


def test_a_cut_between_the_tap_and_the_last_block_is_refused_with_the_limit():
    with pytest.raises(ValueError, match="frozen_backbone_blocks <= 1"):
        split_backbone(_toy(), 2)
    with pytest.raises(ValueError, match="before the last"):
        MultiScaleFeatures(nn.Sequential(nn.ReLU(), nn.ReLU()), tap=1)


def test_mobilenet_v2_multiscale_stacks_block_13_onto_the_output():
    built = build_backbone("mobilenet_v2_multiscale", pretrained=False)
    net = built.module.eval()
    assert built.out_channels == 96 + 1280 and built.stride == 32
    x = torch.randn(1, 3, 64, 64)
    out = net(x)
    assert out.shape == (1, 1376, 2, 2)
    with torch.no_grad():
        prefix, suffix = split_backbone(net, 7)
        torch.testing.assert_close(suffix(prefix(x)), out)


def test_the_shallow_grid_copies_each_deep_cell_onto_the_cells_it_covers():
    blocks = _toy().blocks
    net = MultiScaleFeatures(blocks, tap=1, grid="shallow").eval()
    x = torch.randn(2, 3, 16, 16)
    shallow = net.blocks[1](net.blocks[0](x))  # (2, 6, 8, 8)
    deep = net.blocks[3](net.blocks[2](shallow))  # (2, 8, 4, 4)
    out = net(x)
    assert out.shape == (2, 14, 8, 8)
    scale = (14 / 2) ** 0.5
    torch.testing.assert_close(out[:, :6], F.normalize(shallow, dim=1) * scale)
    # local cell (i, j) carries deep cell (i // 2, j // 2)
    expected = F.normalize(deep, dim=1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) * scale
    torch.testing.assert_close(out[:, 6:], expected)
    prefix, suffix = split_backbone(net, 1)
    torch.testing.assert_close(suffix(prefix(x)), out)
    with pytest.raises(ValueError, match="'deep' or 'shallow'"):
        MultiScaleFeatures(blocks, tap=1, grid="coarse")


def test_mobilenet_v2_multiscale14_has_block_13s_grid():
    built = build_backbone("mobilenet_v2_multiscale14", pretrained=False)
    assert built.out_channels == 1376 and built.stride == 16
    out = built.module.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1376, 4, 4)
