"""Backbones: the convolutional part ``f`` of a ProtoPNet.

A registry maps a name to a builder returning a :class:`Backbone` — a module mapping images
(B, 3, S, S) to feature maps (B, C, S/r, S/r) — plus the facts that belong with its weights
(channels, normalisation mean and std), never repeated in configs.

Names: ``vgg11 vgg11_bn vgg13 vgg13_bn vgg16 vgg16_bn vgg19 vgg19_bn resnet18 resnet34 resnet50
resnet101 resnet152 densenet121 densenet161 densenet169 densenet201 mobilenet_v2``, the same at
output stride 16 (a 14 x 14 latent grid at 224 px: ``mobilenet_v2_stride16``,
``resnet50_stride16``, ``resnet101_stride16``, ``resnet152_stride16``), the
from-scratch ``tiny_cnn`` (``tiny_cnn_gn``, the same with GroupNorm; ``tiny_cnn_rf14``, with a
smaller receptive field: the demo's), and
``timm/<name>`` for any timm model (optional extra).
Pretrained weights come through torchvision's own weights API (``IMAGENET1K_V1``), so a machine
whose ``$TORCH_HOME/hub/checkpoints/`` holds the file loads it without a network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor and the facts that go with it.

    Attributes:
        module: maps (B, 3, S, S) -> (B, out_channels, H, W).
        out_channels: C, the channels of the feature map.
        mean, std: the input normalisation the weights expect.
        stride: the total down-sampling factor S / H.
    """

    module: nn.Module
    out_channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stride: int = 32


class _ReLUAfter(nn.Module):
    """DenseNet's ``features`` end in a BatchNorm; torchvision applies ReLU after it in forward."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


class _ResNetFeatures(nn.Module):
    """ResNet without its average pool and fully connected layer: (B, 3, S, S) -> (B, C, S/32, S/32)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyCNN(nn.Module):
    """A small from-scratch CNN (stride 8) for the offline demo: (B, 3, S, S) -> (B, 128, S/8, S/8).

    At 64 px its 8 x 8 map gives each latent cell an 8-pixel footprint, fine enough for part boxes.
    Its receptive field is 26 pixels by default (four 3x3 convolutions, three 2x2 max pools, a
    1x1), so a latent cell describes a part and its immediate surroundings, not most of the image.

    ``receptive_field``: 26 (``tiny_cnn``) or 14 (``tiny_cnn_rf14``, the demo's): the second and
    third convolutions are 1 x 1 instead of 3 x 3, so a cell's receptive field reaches only 3
    pixels past its 8-pixel footprint on each side. A part somewhat larger than a cell is then
    seen whole only from the cell on its centre, and in part from its neighbours, so the nearest
    patch to a part prototype is the cell on the part, not the one beside it
    (docs/demo-experiments.md).

    ``norm``: ``batch`` (BatchNorm, the demo's) or ``group`` (GroupNorm with 8 groups: each image
    is normalised on its own, so a batch split across processes computes exactly what one process
    computes, and training and evaluation behave alike; SyncBatchNorm, the usual cure for
    BatchNorm in DistributedDataParallel, needs GPUs).
    """

    def __init__(self, width: int = 32, norm: str = "batch", receptive_field: int = 26) -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        if receptive_field not in (14, 26):
            raise ValueError(f"receptive_field must be 14 or 26, got {receptive_field!r}")
        kernel = 3 if receptive_field == 26 else 1  # of the second and third convolutions

        def block(cin: int, cout: int, stride: int, kernel: int = 3) -> list[nn.Module]:
            layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(min(8, cout), cout)
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), layer, nn.ReLU(inplace=True)]

        # Down-sampling by 2x2 max pooling puts the centre of latent cell (i, j) at pixel
        # (8j + 3.5, 8i + 3.5): exactly where bicubic upsampling (align_corners=False) puts it, so
        # an activation box lands where the cell looks (stride-2 convolutions would shift it by
        # 3.5 pixels).
        self.layers = nn.Sequential(
            *block(3, width, 1),  # receptive field 3
            nn.MaxPool2d(2),  # 4
            *block(width, 2 * width, 1),  # 8
            *block(2 * width, 2 * width, 1, kernel=kernel),  # 12 (8 with 1 x 1 kernels)
            nn.MaxPool2d(2),  # 14 (10)
            *block(2 * width, 4 * width, 1, kernel=kernel),  # 22 (10)
            nn.MaxPool2d(2),  # 26 (14)
            *block(4 * width, 4 * width, 1, kernel=1),  # 26 (14)
        )
        self.receptive_field = receptive_field
        self.out_channels = 4 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = "IMAGENET1K_V1" if pretrained else None
    return torchvision.models.get_model(name, weights=weights)


def _vgg(name: str) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        net = _torchvision_model(name, pretrained)
        return Backbone(net.features, 512, stride=32)

    return build


def _resnet(name: str, channels: int) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        return Backbone(_ResNetFeatures(_torchvision_model(name, pretrained)), channels, stride=32)

    return build


def _densenet(name: str, channels: int) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        return Backbone(_ReLUAfter(_torchvision_model(name, pretrained).features), channels, stride=32)

    return build


def _mobilenet_v2(pretrained: bool) -> Backbone:
    return Backbone(_torchvision_model("mobilenet_v2", pretrained).features, 1280, stride=32)


def _mobilenet_v2_stride16(pretrained: bool) -> Backbone:
    """MobileNetV2 whose last stage keeps the 14 x 14 resolution (at 224 px): block 14's
    depth-wise convolution loses its stride 2 and blocks 15-17's are dilated by 2, so every
    block sees what it saw with the ImageNet weights (the atrous trick of DeepLab); a latent grid
    twice as fine for about 1.9x the backbone's compute."""
    features = _torchvision_model("mobilenet_v2", pretrained).features
    for index, block in enumerate(features[14:18], start=14):
        depthwise = block.conv[1][0]  # InvertedResidual: expand, depth-wise (3x3), project
        if index == 14:
            depthwise.stride = (1, 1)
            block.stride = 1
        else:
            depthwise.dilation, depthwise.padding = (2, 2), (2, 2)
    return Backbone(features, 1280, stride=16)


MULTISCALE_GRIDS = ("deep", "shallow")


def multiscale_concat(shallow: torch.Tensor, deep: torch.Tensor, grid: str = "deep") -> torch.Tensor:
    """(B, Cs, Hs, Ws) local and (B, Cd, H, W) deep features -> (B, Cs + Cd, H, W) with
    ``grid="deep"`` (the local features averaged onto the deep grid), or -> (B, Cs + Cd, Hs, Ws)
    with ``grid="shallow"`` (each deep cell copied onto the local cells it covers, nearest
    neighbour). Each part is L2-normalised per cell and scaled to the same length
    ``sqrt((Cs + Cd) / 2)`` (so neither part outweighs the other in an angle, and a channel is
    about 1 in size, as the add-on's initialisation expects), then stacked as channels."""
    if grid not in MULTISCALE_GRIDS:
        raise ValueError(f"grid must be 'deep' or 'shallow', got {grid!r}")
    if shallow.shape[-2:] != deep.shape[-2:]:
        if grid == "deep":
            shallow = F.adaptive_avg_pool2d(shallow, deep.shape[-2:])
        else:
            deep = F.interpolate(deep, size=shallow.shape[-2:], mode="nearest")
    scale = ((shallow.shape[1] + deep.shape[1]) / 2) ** 0.5
    return torch.cat([F.normalize(shallow, dim=1) * scale, F.normalize(deep, dim=1) * scale], dim=1)


class MultiScaleFeatures(nn.Module):
    """A sequential backbone whose output also carries an earlier block's local features
    (:func:`multiscale_concat`): (B, 3, S, S) -> (B, C_tap + C_out, S/r, S/r).

    The deep output says what the picture is, the earlier block says what is where: measured by
    angle, a part's mean vector in MobileNetV2's output finds the same part in 11 % of the
    oracle (class, part) prototypes on CUB, in block 13's output in 67 %, and in the two stacked
    in 72 % (``benchmarks/part_oracle.py``). Beyond the paper.

    Args:
        blocks: the backbone's blocks in forward order.
        tap: the index of the block whose output is kept.
        grid: ``"deep"`` (output on the last block's grid) or ``"shallow"`` (on the tapped
            block's finer grid); see :func:`multiscale_concat`.
    """

    def __init__(self, blocks: nn.Sequential, tap: int, grid: str = "deep") -> None:
        super().__init__()
        if not 0 <= tap < len(blocks) - 1:
            raise ValueError(f"tap must be a block before the last (0..{len(blocks) - 2}), got {tap}")
        if grid not in MULTISCALE_GRIDS:
            raise ValueError(f"grid must be 'deep' or 'shallow', got {grid!r}")
        self.blocks = blocks
        self.tap = int(tap)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = x
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.tap:
                shallow = x
        return multiscale_concat(shallow, x, self.grid)

    def segment(self, start: int, end: int) -> nn.Module:
        """The blocks ``start..end-1`` as a module: plain blocks when they end at or before the
        tap, the multi-scale tail when they end at the last block (and start at or before the
        tap); a cut between the tap and the end has no single-tensor output and is refused."""
        blocks = list(self.blocks)
        if end <= self.tap + 1:
            return nn.Sequential(*blocks[start:end])
        if end == len(blocks) and start <= self.tap:
            return MultiScaleFeatures(nn.Sequential(*blocks[start:end]), self.tap - start, self.grid)
        raise ValueError(
            f"blocks {start}..{end - 1} cut this multi-scale backbone between its tapped block {self.tap} and its last block; "
            f"a prefix of at most {self.tap} blocks can be cut off (schedule.frozen_backbone_blocks <= {self.tap})"
        )


def _mobilenet_v2_multiscale(pretrained: bool) -> Backbone:
    """MobileNetV2 whose output stacks block 13's (the last 14 x 14 block at 224 px, 96 channels)
    onto block 18's (1280): :class:`MultiScaleFeatures`."""
    features = _torchvision_model("mobilenet_v2", pretrained).features
    return Backbone(MultiScaleFeatures(features, 13), 96 + 1280, stride=32)


def _mobilenet_v2_multiscale14(pretrained: bool) -> Backbone:
    """:func:`_mobilenet_v2_multiscale` on block 13's 14 x 14 grid (at 224 px): block 18's
    features copied onto the four cells each covers. A latent grid twice as fine at the
    backbone's own cost (the oracle part prototypes find their part in 76 % of the pairs)."""
    features = _torchvision_model("mobilenet_v2", pretrained).features
    return Backbone(MultiScaleFeatures(features, 13, grid="shallow"), 96 + 1280, stride=16)


def _resnet_stride16(name: str, channels: int) -> Callable[[bool], Backbone]:
    """A ResNet whose layer4 is dilated instead of strided (torchvision's
    ``replace_stride_with_dilation``): 14 x 14 latent grid at 224 px. Bottleneck ResNets only
    (torchvision does not dilate the basic blocks of resnet18/34)."""

    def build(pretrained: bool) -> Backbone:
        import torchvision

        weights = "IMAGENET1K_V1" if pretrained else None
        net = torchvision.models.get_model(name, weights=weights, replace_stride_with_dilation=[False, False, True])
        return Backbone(_ResNetFeatures(net), channels, stride=16)

    return build


def _tiny_cnn(norm: str, receptive_field: int = 26) -> Callable[[bool], Backbone]:
    name = ("tiny_cnn" if norm == "batch" else "tiny_cnn_gn") + ("" if receptive_field == 26 else f"_rf{receptive_field}")

    def build(pretrained: bool) -> Backbone:
        if pretrained:
            raise ValueError(f"backbone {name!r} has no pretrained weights: use pretrained=False")
        net = TinyCNN(norm=norm, receptive_field=receptive_field)
        return Backbone(net, net.out_channels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), stride=8)

    return build


BACKBONES: dict[str, Callable[[bool], Backbone]] = {
    **{name: _vgg(name) for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
    "resnet18": _resnet("resnet18", 512),
    "resnet34": _resnet("resnet34", 512),
    "resnet50": _resnet("resnet50", 2048),
    "resnet101": _resnet("resnet101", 2048),
    "resnet152": _resnet("resnet152", 2048),
    "densenet121": _densenet("densenet121", 1024),
    "densenet161": _densenet("densenet161", 2208),
    "densenet169": _densenet("densenet169", 1664),
    "densenet201": _densenet("densenet201", 1920),
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v2_stride16": _mobilenet_v2_stride16,
    "mobilenet_v2_multiscale": _mobilenet_v2_multiscale,
    "mobilenet_v2_multiscale14": _mobilenet_v2_multiscale14,
    "resnet50_stride16": _resnet_stride16("resnet50", 2048),
    "resnet101_stride16": _resnet_stride16("resnet101", 2048),
    "resnet152_stride16": _resnet_stride16("resnet152", 2048),
    "tiny_cnn": _tiny_cnn("batch"),
    "tiny_cnn_gn": _tiny_cnn("group"),
    "tiny_cnn_rf14": _tiny_cnn("batch", receptive_field=14),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone` (``timm/<name>`` works too when timm is installed)."""
    return sorted(BACKBONES)


def _timm_backbone(name: str, pretrained: bool) -> Backbone:
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            f"backbone 'timm/{name}' needs timm: pip install 'protopnet[timm]'"
        ) from error
    net = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=(-1,))
    info = net.feature_info
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))

    class _Last(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)[-1]

    return Backbone(_Last(net), int(info.channels()[-1]), mean=mean, std=std, stride=int(info.reduction()[-1]))


def build_backbone(name: str, pretrained: bool = True) -> Backbone:
    """Build the backbone called ``name``.

    Raises:
        ValueError: ``name`` is not a known backbone (the message lists the known ones).
    """
    if name.startswith("timm/"):
        return _timm_backbone(name[len("timm/"):], pretrained)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())} or 'timm/<name>'"
        )
    return BACKBONES[name](pretrained)
