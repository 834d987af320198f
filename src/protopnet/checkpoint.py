"""Model directories and training checkpoints that are safe to open.

A model directory holds:

    model.safetensors   every tensor (safetensors: no code runs when it is read)
    model.json          architecture, class names, image settings, push provenance, history,
                        the SHA-256 of model.safetensors (a truncated or altered file is refused)
    config.yaml         the run config that trained it (when trained by protopnet)
    prototypes/*.png    each prototype's patch, source image with box, activation overlay

Loading never unpickles: ``.pt``/``.pth``/``.pkl`` files are refused, and ``torch.load`` is never
called. Every file is written atomically (temporary file, fsync, rename), and a whole directory
is written beside its target and renamed into place, so a reader sees the old or the new
version, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

FORMAT = "protopnet-model"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


class CheckpointError(ValueError):
    """A model directory or checkpoint that cannot be used; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose loading could execute code (a pickle) was refused."""


# -- atomic files -------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old or the whole new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_directory_atomically(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` by calling ``fill(tmp_dir)`` on a fresh sibling directory, then renaming
    it into place (an existing ``target`` is replaced). Returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -- tensors inside JSON-able state ------------------------------------------------------------

def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, numbers, strings, tensors) into a JSON-able skeleton
    and a flat ``{key: tensor}`` dict; tensors become ``{"__tensor__": key}`` in the skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {key or 'top level'})")

    return walk(obj, prefix or "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint state refers to a missing tensor {key!r}")
            return tensors[key]
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
        raise CheckpointError("malformed checkpoint state")
    return skeleton


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors as safetensors atomically; returns the file's SHA-256."""
    data = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its SHA-256 when given."""
    path = Path(path)
    refuse_pickle(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise CheckpointError(f"{path}: checksum mismatch — the file is truncated or was altered")
    try:
        return load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from None


def refuse_pickle(path: str | Path) -> None:
    """Refuse files whose loading could execute code."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path}: pickled checkpoints are refused (loading a pickle can run arbitrary code); "
            "a protopnet model is a directory with model.safetensors and model.json"
        )
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # pickle protocol >= 2, or torch's zip format
            raise UnsafeCheckpointError(f"{path}: looks like a pickle / torch.save archive; refused (loading it could run code)")


def safe_relative_path(directory: Path, relative: str) -> Path:
    """Resolve a path stored in a model's JSON, refusing anything outside ``directory``."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        raise CheckpointError(f"path {relative!r} in model.json must be relative to the model directory")
    resolved = (directory / relative).resolve()
    root = directory.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(f"path {relative!r} in model.json points outside the model directory")
    return resolved


# -- model directories -------------------------------------------------------------------------

def model_metadata(model: ProtoPNet) -> dict[str, Any]:
    """Everything but the tensors, as JSON."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "protopnet",
        "architecture": model.config(),
        "image": {"size": int(getattr(model, "image_size", 224)), "mean": list(model.mean), "std": list(model.std)},
        "provenance": model.provenance,
        "history": model.history,
    }


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
            pictures are drawn into ``prototypes/``.
        run_config: the resolved run config, written as ``config.yaml``.
        extra: more JSON to keep in ``model.json`` (metrics, for example).
    """
    import yaml

    from .visualize import save_prototype_images

    def fill(tmp: Path) -> None:
        state = {k: v for k, v in model.state_dict().items()}
        digest = save_tensors(tmp / "model.safetensors", state)
        meta = model_metadata(model)
        if dataset is not None and model.provenance:
            save_prototype_images(meta["provenance"], dataset, tmp)
        elif model.provenance and getattr(model, "source_directory", None):
            _copy_prototype_images(Path(model.source_directory), tmp, meta["provenance"])
        meta["tensors"] = {"file": "model.safetensors", "sha256": digest}
        if extra:
            meta["extra"] = extra
        if run_config is not None:
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        atomic_write_json(tmp / "model.json", meta)

    path = write_directory_atomically(directory, fill)
    model.source_directory = str(path)
    return path


def _copy_prototype_images(source: Path, target: Path, provenance: list[dict[str, Any]]) -> None:
    for entry in provenance:
        for kind, relative in dict(entry.get("images") or {}).items():
            try:
                src = safe_relative_path(source, relative)
            except CheckpointError:
                entry["images"].pop(kind, None)
                continue
            if src.is_file():
                dst = target / relative
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            else:
                entry["images"].pop(kind, None)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and check ``model.json`` of a model directory."""
    directory = Path(directory)
    if directory.is_file():
        refuse_pickle(directory)
        raise CheckpointError(f"{directory}: a protopnet model is a directory (model.safetensors + model.json), not a file")
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        pickles = [p.name for p in directory.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES] if directory.is_dir() else []
        if pickles:
            raise UnsafeCheckpointError(f"{directory}: holds only pickled files ({', '.join(pickles)}); refused — loading a pickle can run code")
        raise CheckpointError(f"{directory}: not a protopnet model directory (no model.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a protopnet model description (format != {FORMAT!r})")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer protopnet (format version {meta.get('version')}); upgrade protopnet")
    for entry in meta.get("provenance") or []:
        for relative in (entry.get("images") or {}).values():
            safe_relative_path(directory, relative)
    return meta


LOADERS: dict[str, Callable[[Path, dict[str, Any], str | torch.device], Any]] = {}


def register_loader(kind: str) -> Callable:
    """Register how to rebuild a model directory whose ``model.json`` says ``kind``."""

    def wrap(fn: Callable) -> Callable:
        LOADERS[kind] = fn
        return fn

    return wrap


@register_loader("protopnet")
def _load_protopnet(directory: Path, meta: dict[str, Any], device: str | torch.device) -> ProtoPNet:
    arch = dict(meta["architecture"])
    try:
        model = ProtoPNet(pretrained=False, **arch)
    except TypeError as error:
        raise CheckpointError(f"{directory}/model.json: architecture does not match this protopnet ({error})") from None
    tensors = load_tensors(directory / meta["tensors"]["file"], meta["tensors"].get("sha256"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: tensors do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.image_size = int(meta.get("image", {}).get("size", 224))
    model.provenance = meta.get("provenance")
    model.history = list(meta.get("history") or [])
    model.source_directory = str(directory)
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild a trained model from its directory alone (no network, no pickle).

    Args:
        path: a model directory written by :func:`save_model` (or a run directory holding one
            in ``model/``).

    Raises:
        UnsafeCheckpointError: the path is a pickle.
        CheckpointError: anything else wrong, with the reason.
    """
    directory = Path(path)
    if directory.is_dir() and not (directory / "model.json").exists() and (directory / "model" / "model.json").exists():
        directory = directory / "model"
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such model directory")
    meta = read_metadata(directory)
    kind = meta.get("kind", "protopnet")
    if kind not in LOADERS:
        _import_optional_loaders()
    if kind not in LOADERS:
        raise CheckpointError(f"{directory}: unknown model kind {kind!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[kind](directory, meta, device)


def _import_optional_loaders() -> None:
    """Modules that register more model kinds (ensembles) are imported on demand."""
    import importlib

    for name in ("protopnet.ensemble",):
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - module not present
            pass
