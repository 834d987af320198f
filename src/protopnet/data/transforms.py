"""The one image normalisation: RGB picture <-> the float tensor a model takes.

Every path into a model — a dataset item (:meth:`ProtoDataset.to_tensor`), an image to explain
(:func:`protopnet.explain.inputs.prepare_input`), a picture a person points at to replace a
prototype (:mod:`protopnet.edit`) — goes through :func:`normalise`, so they give the same numbers.

    >>> x = normalise(picture, model.mean, model.std)   # (3, S, S) float32
    >>> denormalise(x, model.mean, model.std)           # the RGB picture again (up to rounding)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def normalise(picture: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB picture (S, S) -> float32 tensor (3, S, S): values scaled to [0, 1], then ``(x - mean) / std``
    per channel. On the CPU."""
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0  # (S, S, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, S, S)
    return (tensor - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def denormalise(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Normalised (3, S, S) tensor -> RGB picture (S, S)."""
    t = tensor.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # (S, S, 3)
    return Image.fromarray(array)
