"""The image to explain, as the model sees it: a file, a PIL picture or a normalised tensor, read
and resized once (:func:`prepare_input`), and the tensor the model takes (:func:`model_input`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from ..data.images import fit_square, open_image
from ..data.transforms import denormalise, normalise

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model import ProtoPNet


@dataclass
class InputImage:
    """The image to explain, as the model sees it.

    Attributes:
        picture: RGB picture of ``size x size`` pixels (the frame every box is given in).
        tensor: the normalised (3, size, size) tensor when the caller gave one, else None.
        path: the file it was read from, or None.
        original_size: (width, height) of the file / PIL picture before resizing, or None.
    """

    picture: Image.Image
    tensor: torch.Tensor | None = None
    path: str | None = None
    original_size: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.picture.width


def prepare_input(image: Any, image_size: int, mean: Sequence[float], std: Sequence[float]) -> InputImage:
    """A path, a PIL picture or a normalised tensor (3, S, S) / (1, 3, S, S) -> :class:`InputImage`
    (an :class:`InputImage` is returned as it is).

    Paths and pictures are resized to ``image_size`` squared (aspect ratio not kept, as the
    datasets do); a tensor is taken as it is (its S is the frame of the boxes).

    Raises:
        protopnet.data.BadImageError: an unreadable file (message ``"<path>: <reason>"``).
        TypeError / ValueError: anything else that is not an image.
    """
    if isinstance(image, InputImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        original = open_image(path)
        return InputImage(fit_square(original, image_size), path=path, original_size=original.size)
    if isinstance(image, Image.Image):
        original = image.convert("RGB")
        return InputImage(fit_square(original, image_size), original_size=original.size)
    if isinstance(image, torch.Tensor):
        tensor = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if tensor.dim() != 3 or tensor.shape[0] != 3 or tensor.shape[1] != tensor.shape[2]:
            raise ValueError(f"expected a normalised image tensor (3, S, S) or (1, 3, S, S), got shape {tuple(image.shape)}")
        return InputImage(denormalise(tensor, mean, std), tensor=tensor.detach())
    raise TypeError(f"cannot explain a {type(image).__name__}: give a file path, a PIL image or a normalised tensor (3, S, S)")


def model_input(model: ProtoPNet | Ensemble, inp: InputImage, device: torch.device) -> torch.Tensor:
    """The (1, 3, S, S) tensor ``model`` takes: the caller's tensor when one was given, else the
    picture normalised with ``model.mean`` / ``model.std``."""
    x = inp.tensor if inp.tensor is not None else normalise(inp.picture, model.mean, model.std)  # (3, S, S)
    return x.unsqueeze(0).to(device, torch.float32)
