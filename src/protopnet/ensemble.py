"""Ensembles of ProtoPNets (paper Section 2.5): the logits of several models, summed.

Each ProtoPNet is a score sheet — class points = sum over prototypes of similarity x last-layer
weight — so the sum of several models' logits is one bigger score sheet over the union of their
prototypes, just as interpretable. :class:`Ensemble` is that model: an ``nn.Module`` whose
``forward`` returns the summed logits plus the members' similarities and distances concatenated,
and which exposes the concatenated prototype facts (classes, last-layer weights, which member each
prototype comes from) so :func:`protopnet.explain` builds the combined score sheet, whose points
add up to the ensemble's logits.

    >>> from protopnet.ensemble import Ensemble
    >>> ensemble = Ensemble([protopnet.load_model(d) for d in ("vgg19", "resnet34", "densenet121")])
    >>> out = ensemble(x)                       # out.logits (B, K) = sum of the members' logits
    >>> e = protopnet.explain(ensemble, x[0])   # one score sheet over every member's prototypes
    >>> ensemble.save("runs/ensemble"); protopnet.load_model("runs/ensemble")   # -> Ensemble

Members must agree on the classes (same number, same names, same order). They may differ in
backbone, prototype count and shape, input size and normalisation:

* The ensemble takes one input: square images of ``ensemble.image_size`` normalised with
  ``ensemble.mean`` / ``ensemble.std`` (by default the largest member input size and the first
  member's normalisation; :func:`protopnet.data.dataset_for_model` prepares data that way).
* Inside, each member gets the input converted to its own preprocessing
  (:meth:`Ensemble.member_input`): un-normalised, resized to the member's size (bilinear, with
  antialiasing when shrinking) and normalised with the member's mean/std. A member whose size and
  normalisation equal the ensemble's gets the input unchanged, so a member alone and inside the
  ensemble give identical numbers. The resize is PyTorch's antialiased bilinear filter written
  as matrix products (:func:`resize_matrix`), so an exported ensemble resizes identically.
  Resizing the normalised tensor is close to but not bit-equal
  with resizing the picture with PIL first; to explain a member exactly as it sees images on its
  own, run it on data prepared with its own size and normalisation.

A saved ensemble is a directory with ``model.json`` (``"kind": "ensemble"``) and one ordinary
model directory per member in ``members/0``, ``members/1``, ...;
:func:`protopnet.load_model` returns the :class:`Ensemble`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic_files import atomic_write_json, write_directory_atomically
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_model,
    read_metadata,
    register_loader,
    safe_relative_path,
    save_model,
)
from .model_card import display_name, write_model_card

logger = logging.getLogger(__name__)

COMBINATION = "sum of the members' logits (paper Section 2.5)"
RESIZE = "bilinear (antialiased when shrinking), align_corners=False, on the un-normalised tensor, as two matrix products"


@functools.lru_cache(maxsize=64)
def _resize_weights(source: int, target: int) -> np.ndarray:
    scale = source / target
    support = scale if scale >= 1.0 else 1.0  # the triangle filter widens when shrinking
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((target, source), dtype=np.float64)
    for i in range(target):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), source)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - centre + 0.5) * inv))
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total > 0 else taps
    return weights


def resize_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) float32 matrix R with ``R @ v`` = ``v`` resized along one axis like
    ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)`` (the separable
    triangle filter PyTorch and PIL use, widened by the scale when shrinking).

    Resizing an image is then ``R_rows @ image @ R_cols.T``: the same numbers as PyTorch's
    antialiased bilinear resize, but made of matrix products with constant weights, which export
    to ONNX (PyTorch's ONNX exporter has no antialiased resize). The weights are computed with
    NumPy, so tracing records them as constants.
    """
    if source < 1 or target < 1:
        raise ValueError(f"sizes must be positive, got {source} -> {target}")
    return torch.from_numpy(_resize_weights(int(source), int(target)).astype(np.float32))


class EnsembleOutput(NamedTuple):
    """What ``ensemble(x)`` returns (the fields of :class:`protopnet.ProtoPNetOutput`).

    Attributes:
        logits: (B, K) the sum of the members' logits.
        min_distances: (B, sum M_i) the members' min distances, concatenated in member order.
        similarities: (B, sum M_i) the members' similarities, concatenated likewise.
        distances: one (B, M_i, H_i', W_i') distance map tensor per member — a list, since the
            members' latent grids may differ.
    """

    logits: torch.Tensor
    min_distances: torch.Tensor
    similarities: torch.Tensor
    distances: list[torch.Tensor]


class Ensemble(nn.Module):
    """Several ProtoPNets whose logits are summed.

    Args:
        members: ProtoPNets (an :class:`Ensemble` among them contributes its members).
        image_size: the ensemble's input side (default: the largest member's ``image_size``).
        mean, std: the ensemble's input normalisation (default: the first member's).

    Raises:
        ValueError: no members, or members that disagree on the classes (the message names the
            member and the difference).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        flat: list[nn.Module] = []
        for member in members:
            flat.extend(member.members if isinstance(member, Ensemble) else [member])
        if not flat:
            raise ValueError("an ensemble needs at least one member model")
        first = flat[0]
        for i, member in enumerate(flat):
            for attribute in ("num_classes", "class_names", "prototype_classes", "last_layer", "image_size", "mean", "std"):
                if not hasattr(member, attribute):
                    raise ValueError(f"ensemble member {i} is not a ProtoPNet (it has no {attribute!r})")
            if member.num_classes != first.num_classes:
                raise ValueError(f"ensemble member {i} has {member.num_classes} classes but member 0 has {first.num_classes}; members must share their classes")
            if list(member.class_names) != list(first.class_names):
                diff = next((k for k, (a, b) in enumerate(zip(member.class_names, first.class_names)) if a != b), None)
                raise ValueError(
                    f"ensemble member {i} names its classes differently from member 0 "
                    f"(class {diff}: {member.class_names[diff]!r} vs {first.class_names[diff]!r}); members must share class names and order"
                )
        self.members = nn.ModuleList(flat)
        self.num_classes = int(first.num_classes)
        self.class_names = list(first.class_names)
        self.image_size = int(image_size) if image_size is not None else max(int(m.image_size) for m in flat)
        self.mean = tuple(float(v) for v in (mean if mean is not None else first.mean))
        self.std = tuple(float(v) for v in (std if std is not None else first.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers each (std > 0), got {self.mean} and {self.std}")
        self.history: list[dict[str, Any]] = []
        self.source_directory: str | None = None

    # -- facts -----------------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_prototypes(self) -> int:
        """sum M_i."""
        return sum(int(m.num_prototypes) for m in self.members)

    @property
    def prototype_classes(self) -> torch.Tensor:
        """(sum M_i,) class of each prototype, members concatenated in order."""
        return torch.cat([m.prototype_classes.detach().cpu() for m in self.members])

    @property
    def prototype_member(self) -> torch.Tensor:
        """(sum M_i,) which member each prototype comes from."""
        return torch.cat([torch.full((int(m.num_prototypes),), i, dtype=torch.long) for i, m in enumerate(self.members)])

    @property
    def prototype_local_index(self) -> torch.Tensor:
        """(sum M_i,) each prototype's index inside its member."""
        return torch.cat([torch.arange(int(m.num_prototypes)) for m in self.members])

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """(K, sum M_i) the members' last-layer weights side by side: ``logits = similarities @ W.T``."""
        return torch.cat([m.last_layer.weight.detach().cpu() for m in self.members], dim=1)

    @property
    def class_identity(self) -> torch.Tensor:
        """(sum M_i, K) one-hot: 1 where a prototype belongs to a class."""
        return F.one_hot(self.prototype_classes, self.num_classes).float()

    @property
    def provenance(self) -> list[dict[str, Any] | None]:
        """One entry per prototype (members concatenated): the member's provenance entry plus
        ``member``, ``member_prototype`` and the global ``prototype`` index; None for prototypes
        of members that were never pushed."""
        out: list[dict[str, Any] | None] = []
        g = 0
        for i, m in enumerate(self.members):
            entries = getattr(m, "provenance", None)
            for j in range(int(m.num_prototypes)):
                entry = entries[j] if entries is not None and j < len(entries) else None
                if entry is None:
                    out.append(None)
                else:
                    out.append({**entry, "prototype": g, "member": i, "member_prototype": j})
                g += 1
        return out

    def member_offsets(self) -> list[int]:
        """Global index of each member's first prototype (length ``num_members``)."""
        offsets, total = [], 0
        for m in self.members:
            offsets.append(total)
            total += int(m.num_prototypes)
        return offsets

    # -- forward ---------------------------------------------------------------------------------
    def member_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The ensemble's input (B, 3, S, S) as member ``i`` expects it: (B, 3, S_i, S_i),
        normalised with the member's mean/std (see the module docstring)."""
        member = self.members[i]
        same_norm = tuple(member.mean) == self.mean and tuple(member.std) == self.std
        size = int(member.image_size)
        if same_norm and x.shape[-1] == size and x.shape[-2] == size:
            return x
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        raw = x * std + mean  # (B, 3, S, S) in [0, 1]
        if x.shape[-1] != size or x.shape[-2] != size:
            rows = resize_matrix(x.shape[-2], size).to(x)  # (S_i, S)
            cols = resize_matrix(x.shape[-1], size).to(x)  # (S_i, S)
            raw = torch.matmul(torch.matmul(rows, raw), cols.t())  # (B, 3, S_i, S_i)
        m_mean = torch.tensor(tuple(member.mean), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        m_std = torch.tensor(tuple(member.std), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (raw - m_mean) / m_std

    def forward(self, x: torch.Tensor) -> EnsembleOutput:
        """(B, 3, S, S) images normalised with the ensemble's mean/std -> :class:`EnsembleOutput`."""
        outputs = [member(self.member_input(x, i)) for i, member in enumerate(self.members)]
        logits = outputs[0].logits
        for out in outputs[1:]:
            logits = logits + out.logits  # (B, K)
        return EnsembleOutput(
            logits,
            torch.cat([o.min_distances for o in outputs], dim=1),  # (B, sum M_i)
            torch.cat([o.similarities for o in outputs], dim=1),  # (B, sum M_i)
            [o.distances for o in outputs],
        )

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{getattr(m, 'backbone_name', '?')}@{m.image_size}" for m in self.members)
        return f"members=[{kinds}], num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, image_size={self.image_size}"

    def save(self, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write this ensemble as a model directory (see :func:`save_ensemble`)."""
        return save_ensemble(self, directory, extra=extra)


# -- saving and loading --------------------------------------------------------------------------

def ensemble_metadata(ensemble: Ensemble, member_paths: Sequence[str]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "ensemble",
        "combination": COMBINATION,
        "resize": RESIZE,
        "num_classes": ensemble.num_classes,
        "class_names": ensemble.class_names,
        "image": {"size": ensemble.image_size, "mean": list(ensemble.mean), "std": list(ensemble.std)},
        "members": [
            {
                "path": path,
                "backbone": getattr(m, "backbone_name", None),
                "num_prototypes": int(m.num_prototypes),
                "image_size": int(m.image_size),
            }
            for path, m in zip(member_paths, ensemble.members)
        ],
        "provenance": None,
        "history": ensemble.history,
    }


def _member_run_config(member: nn.Module) -> dict[str, Any] | None:
    source = getattr(member, "source_directory", None)
    if not source or not (Path(source) / "config.yaml").is_file():
        return None
    import yaml

    try:
        return yaml.safe_load((Path(source) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        logger.warning("not copying %s/config.yaml: %s", source, error)
        return None


def save_ensemble(ensemble: Ensemble, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``ensemble`` as one model directory, atomically (a reader sees the old or the whole
    new directory): ``model.json`` (kind ``ensemble``) and ``members/<i>/``, each an ordinary
    model directory (tensors, provenance, prototype pictures and run config of member i)."""
    paths = [f"members/{i}" for i in range(ensemble.num_members)]
    sources = [getattr(m, "source_directory", None) for m in ensemble.members]

    def fill(tmp: Path) -> None:
        (tmp / "members").mkdir()
        for path, member in zip(paths, ensemble.members):
            save_model(member, tmp / path, run_config=_member_run_config(member))
        meta = ensemble_metadata(ensemble, paths)
        if extra:
            meta["extra"] = extra
        atomic_write_json(tmp / "model.json", meta)
        write_model_card(tmp, name=display_name(directory))

    try:
        target = write_directory_atomically(directory, fill)
    finally:
        for member, source in zip(ensemble.members, sources):  # save_model pointed them at the temporary copy
            member.source_directory = source
    for path, member in zip(paths, ensemble.members):
        member.source_directory = str(target / path)
    ensemble.source_directory = str(target)
    logger.info("saved an ensemble of %d members to %s", ensemble.num_members, target)
    return target


@register_loader("ensemble")
def _load_ensemble(directory: Path, meta: dict[str, Any], device: str | torch.device) -> Ensemble:
    members_meta = meta.get("members")
    if not isinstance(members_meta, list) or not members_meta:
        raise CheckpointError(f"{directory}/model.json: an ensemble needs a non-empty 'members' list")
    root = directory.resolve()
    members = []
    for i, entry in enumerate(members_meta):
        relative = entry.get("path") if isinstance(entry, dict) else entry
        path = safe_relative_path(directory, relative)  # a non-string, absolute or escaping path is refused
        if path == root:
            raise CheckpointError(f"{directory}/model.json: member {i} path {relative!r} is the ensemble directory itself")
        if not (path / "model.json").is_file():
            raise CheckpointError(f"{directory}/model.json: member {i} ({relative!r}) is not a model directory")
        read_metadata(path)
        members.append(load_model(path, device=device))
    image = meta.get("image") or {}
    history = meta.get("history") or []
    if not isinstance(image, dict) or not isinstance(history, list):
        raise CheckpointError(f"{directory}/model.json: 'image' must be an object and 'history' a list")
    size = image.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 16384):
        raise CheckpointError(f"{directory}/model.json: image size {size!r} is not an integer in 1..16384")
    try:
        ensemble = Ensemble(members, image_size=size, mean=image.get("mean"), std=image.get("std"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory}: {error}") from None
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or names != ensemble.class_names):
        raise CheckpointError(f"{directory}/model.json: class_names do not match the members' classes")
    ensemble.history = list(history)
    ensemble.source_directory = str(directory)
    return ensemble.to(device).eval()
