"""Export a ProtoPNet (or an ensemble) to ONNX or TorchScript for serving without protopnet.

    >>> from protopnet.export import check_export, export_onnx
    >>> export_onnx(model, "model.onnx")
    >>> check_export(model, "model.onnx")       # max |difference| per output vs PyTorch

The exported graph takes ``images`` (B, 3, S, S) — square pictures of the model's input size S,
scaled to [0, 1] and normalised with the model's mean/std (recorded in the file) — and returns

* ``logits`` (B, K),
* ``similarities`` (B, M): each prototype's similarity to its closest patch,
* ``distances`` (B, M, H', W'): the squared-distance map of every prototype over the patches
  (for an :class:`~protopnet.ensemble.Ensemble`, one output ``distances_<i>`` per member, since
  the members' grids may differ),

so a served model can still explain itself ("this looks like that": the similarity and where).
The batch axis is dynamic. Files are written atomically.

ONNX needs the optional extra ``protopnet[export]`` (onnx, onnxruntime), imported only when used;
the file's ``metadata_props`` hold the input size, mean, std, class names and prototype classes.
TorchScript files (made by tracing) carry the same facts in an extra file ``protopnet.json``
(``torch.jit.load(path, _extra_files={"protopnet.json": ""})``).

The ONNX graph comes from PyTorch's TorchScript-based exporter (``dynamo=False``): it needs
nothing beyond onnx, and the ProtoPNet graph (convolutions, sums, a clamp, a min and a log)
exports exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from .ensemble import Ensemble
    from .model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
EXPORT_EXTRA = "pip install 'protopnet[export]'"


def _is_ensemble(model: ProtoPNet | Ensemble) -> bool:
    from .ensemble import Ensemble

    return isinstance(model, Ensemble)


class ExportWrapper(nn.Module):
    """Wraps a ProtoPNet or Ensemble so its forward returns a flat tuple of tensors:
    ``(logits (B, K), similarities (B, M), distances (B, M, H', W'))`` — for an ensemble the
    distances are one tensor per member."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        distances = out.distances if isinstance(out.distances, (list, tuple)) else [out.distances]
        return (out.logits, out.similarities, *distances)


def output_names(model: ProtoPNet | Ensemble) -> list[str]:
    """Names of the exported outputs, in order."""
    if _is_ensemble(model):
        return ["logits", "similarities", *[f"distances_{i}" for i in range(model.num_members)]]
    return ["logits", "similarities", "distances"]


def export_metadata(model: ProtoPNet | Ensemble) -> dict[str, str]:
    """Facts a server needs, as strings (ONNX ``metadata_props``)."""
    from . import __version__

    return {
        "producer": f"protopnet {__version__}",
        "kind": "ensemble" if _is_ensemble(model) else "protopnet",
        "input": "images: float32 (batch, 3, image_size, image_size), RGB scaled to [0, 1] then (x - mean) / std",
        "image_size": str(int(model.image_size)),
        "mean": json.dumps([float(v) for v in model.mean]),
        "std": json.dumps([float(v) for v in model.std]),
        "class_names": json.dumps(list(model.class_names)),
        "num_classes": str(int(model.num_classes)),
        "num_prototypes": str(int(model.num_prototypes)),
        "prototype_classes": json.dumps([int(c) for c in model.prototype_classes.tolist()]),
        "outputs": json.dumps(output_names(model)),
        "similarity": getattr(model, "activation", None) or json.dumps([m.activation for m in model.members]),
    }


def _example_input(model: ProtoPNet | Ensemble, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    size = int(model.image_size)
    return torch.randn(batch_size, 3, size, size, generator=generator).to(device)


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"ONNX export needs the onnx package: {EXPORT_EXTRA}") from error
    return onnx


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"checking an ONNX export needs onnxruntime: {EXPORT_EXTRA}") from error
    return onnxruntime


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing warns about shape checks turned into constants (the shapes are fixed by the model)
    and about TorchScript's deprecation; neither says anything about this graph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX|torch\.jit\.trace|is deprecated|will be removed).*")
        yield


def export_onnx(model: ProtoPNet | Ensemble, path: str | Path, *, opset: int = DEFAULT_OPSET, batch_size: int = 2) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch axis (atomically).

    Args:
        model: a ProtoPNet or Ensemble (exported in eval mode; its mode is restored).
        batch_size: the batch of the example input used for tracing (any batch runs later).

    Raises:
        ImportError: onnx is missing (the message names the ``protopnet[export]`` extra).
    """
    onnx = _require_onnx()
    from .atomic_files import atomic_write_bytes

    names = output_names(model)
    wrapper = ExportWrapper(model)
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with _quiet_tracing():
            dynamic = {"images": {0: "batch"}, **{name: {0: "batch"} for name in names}}
            torch.onnx.export(
                wrapper,
                (_example_input(model, batch_size),),
                buffer,
                dynamo=False,
                input_names=["images"],
                output_names=names,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, export_metadata(model))
    proto.doc_string = "ProtoPNet ('This Looks Like That'): outputs " + ", ".join(names)
    onnx.checker.check_model(proto)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    logger.info("wrote ONNX model %s (%d bytes, opset %d)", path, path.stat().st_size, opset)
    return path


def export_torchscript(model: ProtoPNet | Ensemble, path: str | Path, *, batch_size: int = 2) -> Path:
    """Write ``model`` as a traced TorchScript file (atomically), the facts of
    :func:`export_metadata` in its extra file ``protopnet.json``. Any batch size runs."""
    from .atomic_files import atomic_write_bytes

    wrapper = ExportWrapper(model)
    was_training = model.training
    model.eval()
    try:
        with _quiet_tracing():
            traced = torch.jit.trace(wrapper, (_example_input(model, batch_size),), check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={"protopnet.json": json.dumps(export_metadata(model))})
    finally:
        model.train(was_training)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("wrote TorchScript model %s (%d bytes)", path, path.stat().st_size)
    return path


@torch.no_grad()
def reference_outputs(model: ProtoPNet | Ensemble, images: torch.Tensor) -> list[torch.Tensor]:
    """The PyTorch outputs the exported file should reproduce, in :func:`output_names` order."""
    was_training = model.training
    model.eval()
    try:
        return [t.detach().float().cpu() for t in ExportWrapper(model)(images)]
    finally:
        model.train(was_training)


def run_onnx(path: str | Path, images: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported ONNX file with onnxruntime (CPU) on images (B, 3, S, S)."""
    ort = _require_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.detach().float().cpu().numpy()})
    return [torch.from_numpy(o) for o in outputs]


def run_torchscript(path: str | Path, images: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported TorchScript file on images (B, 3, S, S)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [t.float() for t in module(images.detach().float().cpu())]


@dataclass
class ExportCheck:
    """How closely an exported file reproduces the PyTorch model.

    Attributes:
        max_abs_diff: the largest absolute difference per output (over all checked inputs).
        worst_ratio: per output, the largest ratio of a difference to what is allowed for that
            element (<= 1 passes; see :func:`check_export`).
        tolerance: the distance tolerance used.
    """

    max_abs_diff: dict[str, float]
    worst_ratio: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(r <= 1.0 for r in self.worst_ratio.values())

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "worst_ratio": self.worst_ratio, "tolerance": self.tolerance, "ok": self.ok}


def _similarity_slopes(model: ProtoPNet | Ensemble, min_distances: torch.Tensor) -> torch.Tensor:
    """|d similarity / d distance| at each min distance (B, M): ``1/(d + eps) - 1/(d + 1)`` for
    the log activation, 1 for the linear one (per member for an ensemble)."""
    nets = list(model.members) if _is_ensemble(model) else [model]
    activation = [net.activation for net in nets for _ in range(int(net.num_prototypes))]
    epsilon = torch.tensor([float(net.epsilon) for net in nets for _ in range(int(net.num_prototypes))])
    is_log = torch.tensor([a == "log" for a in activation])
    d = min_distances.double().clamp_min(0)
    slope = 1.0 / (d + epsilon.double()) - 1.0 / (d + 1.0)
    return torch.where(is_log, slope, torch.ones_like(slope))


def check_export(
    model: ProtoPNet | Ensemble,
    path: str | Path,
    format: str = "onnx",
    *,
    batch_sizes: tuple[int, ...] = (1, 3),
    tolerance: float = 1e-4,
    seed: int = 0,
    images: torch.Tensor | None = None,
) -> ExportCheck:
    """Compare an exported file with the PyTorch model on random inputs of several batch sizes.

    What passes: every distance within ``tolerance`` of PyTorch's; every similarity within
    ``tolerance`` plus the change a distance error of ``tolerance`` causes through the
    activation (``|ds/dd| * tolerance``); every logit within ``tolerance`` plus those similarity
    allowances weighted by the last layer. The allowance matters for trained models: a pushed
    prototype sits at a squared distance near 0 from its nearest patches, where the log
    activation's slope is about ``1 / epsilon = 1e4``, so float32 rounding of the distance
    (``||z||^2 - 2 z.p + ||p||^2``, about 1e-5 whichever runtime computes it) moves the
    similarity by about 1e-3 — in PyTorch itself as much as between runtimes.

    Args:
        images: check on these (B, 3, S, S) normalised images instead of random ones.

    Returns:
        an :class:`ExportCheck` (``.ok``, the raw ``.max_abs_diff`` per output).
    """
    generator = torch.Generator().manual_seed(seed)
    size = int(model.image_size)
    names = output_names(model)
    worst = {name: 0.0 for name in names}
    ratio = {name: 0.0 for name in names}
    device = next(model.parameters()).device
    weight = (model.last_layer_weight if _is_ensemble(model) else model.last_layer.weight).detach().double().cpu().abs()  # (K, M)
    batches = [images] if images is not None else [torch.randn(b, 3, size, size, generator=generator) for b in batch_sizes]
    for batch in batches:
        expected = reference_outputs(model, batch.to(device))
        got = run_onnx(path, batch) if format == "onnx" else run_torchscript(path, batch)
        if len(got) != len(expected):
            raise ValueError(f"{path}: {len(got)} outputs, expected {len(expected)} ({names})")
        for name, e, g in zip(names, expected, got):
            if tuple(e.shape) != tuple(g.shape):
                raise ValueError(f"{path}: output {name} has shape {tuple(g.shape)} for batch {len(batch)}, expected {tuple(e.shape)}")
        min_d = torch.cat([e.flatten(2).amin(2) for e in expected[2:]], dim=1)  # (B, M)
        allowed_sim = tolerance + _similarity_slopes(model, min_d) * tolerance  # (B, M)
        allowed = {
            "logits": tolerance + allowed_sim @ weight.t(),  # (B, K)
            "similarities": allowed_sim,
        }
        for name, e, g in zip(names, expected, got):
            diff = (e.double() - g.double()).abs()
            if diff.numel() == 0:
                continue
            worst[name] = max(worst[name], float(diff.max()))
            ratio[name] = max(ratio[name], float((diff / allowed.get(name, torch.tensor(tolerance, dtype=torch.float64))).max()))
    return ExportCheck(worst, ratio, tolerance)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an exported ONNX file."""
    onnx = _require_onnx()
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def read_torchscript_metadata(path: str | Path) -> dict[str, str]:
    """The facts stored in an exported TorchScript file's ``protopnet.json``."""
    extra = {"protopnet.json": ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["protopnet.json"] or "{}")
