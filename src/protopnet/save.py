"""Saving a model with the pictures of its prototypes: drawing (:mod:`protopnet.visualize`)
and storing (:mod:`protopnet.checkpoint`, which only stores and loads) in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import save_model as store_model
from .model.protopnet import ProtoPNet
from .visualize import draw_prototype_pictures


def save_model(
    model: ProtoPNet,
    directory: str | Path,
    *,
    dataset: Any = None,
    run_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a model directory (atomically replacing an existing one).

    Args:
        dataset: the push dataset; when given and the model has provenance, the prototype
            pictures are drawn from it into ``prototypes/`` (otherwise those of the directory
            the model was loaded from are copied).
        run_config: the resolved run config, written as ``config.yaml``.
        extra: more JSON to keep in ``model.json`` (metrics, for example).

    Returns:
        the model directory. See :func:`protopnet.checkpoint.save_model` for what it holds.
    """
    pictures = None
    if dataset is not None and model.provenance:
        pictures = draw_prototype_pictures(model.provenance, dataset)
    return store_model(model, directory, pictures=pictures, run_config=run_config, extra=extra)
