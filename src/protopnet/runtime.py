"""Device and arithmetic choices: one place that turns ``device``/``precision`` options into
PyTorch objects. Nothing here changes global state."""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is checked and returned."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here; use device=cpu or auto")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} asked for, but Apple MPS is not available here; use device=cpu or auto")
    return resolved


def resolve_precision(device: torch.device, precision: str) -> str:
    """The arithmetic a run uses on ``device`` for the configured ``precision``.

    ``bf16`` on a CUDA GPU without bfloat16 (before Ampere) becomes ``fp16`` (the trainer then
    scales the loss with a GradScaler); ``fp16`` on a CPU is refused (use bf16: CPUs with
    AVX-512 BF16 or AMX run it natively). Everything else is returned unchanged.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16: using fp16 autocast with loss scaling instead")
        return "fp16"
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """An autocast context for ``precision`` (fp32: none). The prototype distances always run in
    float32 (see :func:`protopnet.model.distances.l2_distance_maps`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on a CPU use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
