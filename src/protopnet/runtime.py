"""Device and arithmetic choices: one place that turns ``device``/``precision`` options into
PyTorch objects. Nothing here changes global state."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence, TypedDict, Unpack

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
#: What ``run.precision`` may say: a precision, or ``auto`` (:func:`native_bf16`).
PRECISION_CHOICES = (*PRECISIONS, "auto")

#: What a parameter named ``progress`` is, everywhere in the package: called with the number of
#: items (images) just finished, once per batch; None reports nothing. ``bar.update`` of a tqdm
#: bar fits.
Progress = Callable[[int], None]

#: What a parameter named ``progress_bars`` is: ``(description, total) -> bar``, a context manager
#: with ``update(n)`` (and ``set_postfix``), one per stage or split; None draws nothing. The CLI
#: passes a tqdm factory (:func:`protopnet.cli.common.progress_factory`).
ProgressBars = Callable[[str, int], ContextManager[Any]]


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


#: oneDNN instruction-set caps (``ONEDNN_MAX_CPU_ISA``) that still include bfloat16 arithmetic.
_BF16_ISA_CAPS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_", "ALL", "DEFAULT")


def _onednn_isa_cap() -> tuple[str, str] | None:
    """``(variable, value)`` of the instruction-set cap oneDNN reads (``ONEDNN_MAX_CPU_ISA``, or
    its older name ``DNNL_MAX_CPU_ISA``), or None when uncapped."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 in hardware, and what says so: a CUDA GPU with bf16
    (Ampere or later), a CPU with AMX tiles or AVX-512 BF16 (``torch.cpu``'s own checks) whose
    oneDNN is not capped below them (``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN emulate bfloat16,
    slowly). Apple MPS and other devices: no."""
    if device.type == "cuda":
        supported = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return supported, "this GPU has bfloat16" if supported else "this GPU has no bfloat16"
    if device.type == "cpu":
        cap = _onednn_isa_cap()
        if cap is not None and not cap[1].upper().startswith(_BF16_ISA_CAPS):
            return False, f"{cap[0]}={cap[1]} caps oneDNN below bfloat16"
        # torch.cpu's checks are private: a PyTorch without one reads as "no such feature"
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return True, "this CPU has AMX"
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            return True, "this CPU has AVX-512 BF16"
        return False, "this CPU has neither AMX nor AVX-512 BF16"
    return False, f"bfloat16 autocast is not used on {device.type}"


def resolve_precision(device: torch.device, precision: str) -> str:
    """The arithmetic a run uses on ``device`` for the configured ``precision``.

    ``auto`` is ``bf16`` where the hardware computes bfloat16 natively (:func:`native_bf16`) and
    ``fp32`` elsewhere; the choice and its reason are logged. ``bf16`` on a CUDA GPU without
    bfloat16 (before Ampere) becomes ``fp16`` (the trainer then scales the loss with a
    GradScaler); ``fp16`` on a CPU is refused (use bf16: CPUs with AVX-512 BF16 or AMX run it
    natively). Everything else is returned unchanged.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISION_CHOICES}")
    if precision == "auto":
        native, reason = native_bf16(device)
        chosen = "bf16" if native else "fp32"
        logger.info("precision auto: %s on %s (%s)", chosen, device.type, reason)
        return chosen
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


@dataclass(frozen=True)
class RunSettings:
    """How one pass over a dataset runs: the settings that evaluation, push, the last-layer
    stage, the nearest-patch search, pruning, editing and the interpretability metrics share.

    Build it once (the trainer from its config, a command from its arguments) and hand it on,
    instead of five keyword arguments at every call.

    Attributes:
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0: read in the calling process).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``, or None: the device the
            model's parameters are on (see :meth:`for_model`).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast of the backbone (:func:`autocast`);
            the prototype distances always run in float32.
        channels_last: feed images (B, 3, S, S) in the channels-last memory layout.
    """

    batch_size: int = 100
    num_workers: int = 0
    device: str | torch.device | None = None
    precision: str = "fp32"
    channels_last: bool = False

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with ``changes`` (field name -> value) in place."""
        return dataclasses.replace(self, **changes)

    def for_model(self, model: torch.nn.Module) -> RunSettings:
        """A copy whose ``device`` is a resolved ``torch.device``: the model's when None."""
        device = self.device if self.device is not None else next(model.parameters()).device
        return self.replace(device=resolve_device(device))

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)

    @classmethod
    def merged(cls, settings: RunSettings | None, default_batch_size: int = 100, /, **fields: Unpack[RunFields]) -> RunSettings:
        """``settings`` (default: ``RunSettings(batch_size=default_batch_size)``) with each of
        ``fields`` that is not None in place: the functions that take a ``settings`` object and,
        beside it, its fields as keywords (``**fields: Unpack[RunFields]``) build theirs here.

        Raises:
            TypeError: a keyword that is no field of :class:`RunSettings`.
        """
        unknown = sorted(set(fields) - set(RunFields.__annotations__))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}: the settings of a pass are {list(RunFields.__annotations__)}")
        base = settings if settings is not None else cls(batch_size=default_batch_size)
        return base.replace(**{name: value for name, value in fields.items() if value is not None})


class RunFields(TypedDict, total=False):
    """The fields of :class:`RunSettings` as keywords. A function that takes
    ``settings: RunSettings | None`` also takes ``**fields: Unpack[RunFields]``: each field
    given (``batch_size=32``, ``device="cuda"``, ...) replaces that field of ``settings``, so
    ``push_prototypes(model, data, batch_size=32)`` works as before the settings object."""

    batch_size: int
    num_workers: int
    device: str | torch.device | None
    precision: str
    channels_last: bool


def open_bar(progress_bars: ProgressBars | None, description: str, total: int) -> Any:
    """``progress_bars(description, total)`` (a context manager with ``update``, ``set_postfix``),
    or one that shows nothing when ``progress_bars`` is None."""
    return NullBar() if progress_bars is None else progress_bars(description, total)


class NullBar:
    """A progress bar that shows nothing (what :func:`open_bar` gives without ``progress_bars``)."""

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs: Any) -> None:
        return None


# -- per-item randomness ---------------------------------------------------------------------------
# Streams of seeded_generator in use: 1 the stability metric's noise, 2 the deletion metric's random
# order (protopnet.interpretability), 3 the noise of stability training (protopnet.train).


def seeded_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator that is a pure function of ``(seed, stream, index)``: per-item randomness
    that does not depend on batching."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def seeded_gaussian(shape: Sequence[int], seed: int, stream: int, index: int, std: float, clip: float) -> torch.Tensor:
    """``N(0, std^2)`` clipped to ``[-clip, clip]``, of ``shape``, float32 on the CPU, drawn from
    :func:`seeded_generator` ``(seed, stream, index)``."""
    noise = torch.randn(tuple(int(v) for v in shape), generator=seeded_generator(seed, stream, index)) * float(std)
    return noise.clamp(-float(clip), float(clip))
