"""Where the shallow-deep alignment cost (``loss.alignment``) gets its features.

The cost (:func:`protopnet.losses.alignment_cost`, Huang et al., ICCV 2023) compares, for every
training image, the self-similarity of an early backbone block's output (local features) with
that of the backbone's output. Both are read from the training forward pass itself through
forward hooks, so no extra pass runs: the block's output (or, when the joint epochs run on a
feature cache that ends at that block, the cached tensor the pass starts from) and the input of
the add-on layers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import ALIGNMENT_DEEP
from .stages import backbone_blocks

logger = logging.getLogger(__name__)

#: The automatic shallow block is the last one whose output is at this stride or finer.
SHALLOW_STRIDE = 8


@torch.no_grad()
def block_sides(features: nn.Module, image_size: int) -> list[int]:
    """The output side (height) of every block of ``features`` (:func:`backbone_blocks` order)
    for one ``image_size`` picture, from one forward pass on zeros."""
    blocks = backbone_blocks(features)
    sides: list[int] = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(lambda _m, _i, out, i=i: sides.__setitem__(i, int(out.shape[-2]) if torch.is_tensor(out) else 0)))
    was_training = features.training
    try:
        features.eval()
        parameter = next(features.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        features(torch.zeros(1, 3, int(image_size), int(image_size), device=device))
    finally:
        for handle in handles:
            handle.remove()
        features.train(was_training)
    return sides


def resolve_alignment_block(features: nn.Module, image_size: int, requested: int | None) -> int:
    """The index of the block whose output is the shallow feature: ``requested`` when given
    (checked), else the last block at stride :data:`SHALLOW_STRIDE` or finer whose grid is finer
    than the backbone's output grid.

    Raises:
        ValueError: the index is out of range, or no block qualifies (name one then).
    """
    sides = block_sides(features, image_size)
    final = sides[-1]
    if requested is not None:
        if not 0 <= requested < len(sides) - 1:
            raise ValueError(f"loss.alignment_block: {requested} is not a block before the backbone's last; this backbone has blocks 0..{len(sides) - 1}")
        if sides[requested] < final:
            raise ValueError(f"loss.alignment_block: block {requested}'s output ({sides[requested]} px side) is coarser than the latent grid ({final})")
        return requested
    candidates = [i for i, side in enumerate(sides[:-1]) if side > final and side * SHALLOW_STRIDE >= image_size]
    if not candidates:
        raise ValueError(f"loss.alignment: no backbone block at stride {SHALLOW_STRIDE} or finer with a grid finer than the latent grid ({final}); name one with loss.alignment_block")
    return candidates[-1]


class AlignmentTaps:
    """Forward hooks that keep, from each training forward pass, the shallow block's output and
    the backbone's output (the add-on layers' input).

    Args:
        model: the ProtoPNet being trained.
        block: the shallow block's index (:func:`resolve_alignment_block`).
        cached_blocks: when the pass starts from a feature cache of the first ``cached_blocks``
            blocks, their number (the shallow block must then be the cache's last block, whose
            output is the pass's input, or a later one); None when the pass starts from pictures.
        deep: ``"backbone"`` keeps the backbone's output (the add-on layers' input, (B, C, H, W)),
            ``"latent"`` the add-on layers' output ((B, D, H, W), where the prototypes live).

    Use as a context manager; :meth:`features` returns ``(shallow, deep)`` after each pass.
    """

    def __init__(self, model: nn.Module, block: int, cached_blocks: int | None, deep: str = "backbone") -> None:
        if deep not in ALIGNMENT_DEEP:
            raise ValueError(f"deep: expected {' or '.join(map(repr, ALIGNMENT_DEEP))}, got {deep!r}")
        blocks = backbone_blocks(model.features)
        self._from_input = cached_blocks is not None and block == cached_blocks - 1
        if cached_blocks is not None and block < cached_blocks - 1:
            raise ValueError(
                f"loss.alignment_block {block} lies inside the cached frozen blocks 0..{cached_blocks - 1}: "
                f"choose a block >= {cached_blocks - 1} or set data.feature_cache: false"
            )
        self._shallow: torch.Tensor | None = None
        self._deep: torch.Tensor | None = None
        if deep == "latent":
            self._handles: list[Any] = [model.add_on.register_forward_hook(self._keep_latent)]
        else:
            self._handles = [model.add_on.register_forward_pre_hook(self._keep_deep)]
        if not self._from_input:
            self._handles.append(blocks[block].register_forward_hook(self._keep_shallow))

    def _keep_shallow(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._shallow = output

    def _keep_deep(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._deep = inputs[0]

    def _keep_latent(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._deep = output

    def features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shallow (B, Cs, Hs, Ws), deep (B, Cd, H, W))`` of the last pass, whose input was
        ``inputs``."""
        shallow = inputs if self._from_input else self._shallow
        if shallow is None or self._deep is None:
            raise RuntimeError("the alignment features were not captured: no forward pass ran through the hooked blocks")
        deep, self._shallow, self._deep = self._deep, None, None
        return shallow, deep

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "AlignmentTaps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
