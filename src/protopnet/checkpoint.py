"""Model directories and training checkpoints that are safe to open.

A model directory holds:

    model.safetensors   every tensor (safetensors: no code runs when it is read)
    model.json          architecture, class names, image settings, push provenance, history,
                        the SHA-256 of model.safetensors (a truncated or altered file is refused)
    config.yaml         the run config that trained it (when trained by protopnet)
    prototypes/*.png    each prototype's patch, source image with box, activation overlay (drawn
                        by the caller, e.g. protopnet.save.save_model; this module only stores)
    README.md           the model card, generated from the files above (see protopnet.model_card);
                        loading never reads it, and a directory without one loads the same

Loading never unpickles: ``.pt``/``.pth``/``.pkl`` files are refused, and ``torch.load`` is never
called. Every file is written atomically (temporary file, fsync, rename), and a whole directory
is written beside its target and renamed into place, so a reader sees the old or the new
version, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .atomic_files import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, write_directory_atomically
from .model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

FORMAT = "protopnet-model"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


class CheckpointError(ValueError):
    """A model directory or checkpoint that cannot be used; the message says why."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose loading could execute code (a pickle) was refused."""


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
            head = handle.read(9)
        if head[8:9] == b"{":  # safetensors: 8-byte header length (its first byte may be 0x80), then JSON
            return
        if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol >= 2, or torch's zip format
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
    pictures: Iterable[tuple[int, Mapping[str, Any]]] | None = None,
    run_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a model directory (atomically replacing an existing one). This only
    stores: the pictures of the prototypes are drawn by the caller (see
    :func:`protopnet.save.save_model`, which draws them from the push dataset).

    Args:
        pictures: when the model has provenance, pairs of a prototype's index and its pictures
            (``{kind: PIL picture}``, e.g. from
            :func:`protopnet.visualize.draw_prototype_pictures`), written as
            ``prototypes/<j>_<kind>.png`` and recorded in its provenance entry's ``images``.
            Without them the pictures of the directory the model was loaded from are copied.
        run_config: the resolved run config, written as ``config.yaml``.
        extra: more JSON to keep in ``model.json`` (metrics, for example).
    """
    import yaml

    from .model_card import display_name, write_model_card

    def fill(tmp: Path) -> None:
        state = {k: v for k, v in model.state_dict().items()}
        digest = save_tensors(tmp / "model.safetensors", state)
        meta = model_metadata(model)
        if pictures is not None and model.provenance:
            _write_prototype_pictures(meta["provenance"], pictures, tmp)
        elif model.provenance and getattr(model, "source_directory", None):
            _copy_prototype_images(Path(model.source_directory), tmp, meta["provenance"])
        meta["tensors"] = {"file": "model.safetensors", "sha256": digest}
        if extra:
            meta["extra"] = extra
        if run_config is not None:
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        atomic_write_json(tmp / "model.json", meta)
        write_model_card(tmp, name=display_name(directory))

    path = write_directory_atomically(directory, fill)
    model.source_directory = str(path)
    return path


#: zlib level and strategy of the prototype PNGs (lossless whatever they are): level 1 encodes
#: about four times faster than Pillow's default 6 for files 5 % larger (photographs compress
#: little either way), and the run-length strategy (zlib's Z_RLE, made for PNG's filtered rows)
#: another 15-25 % faster than the default strategy at the same or a smaller size
#: (224-px CUB photographs: 2.7 against 3.7 ms a picture, 73 KiB either way).
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE


def _write_prototype_pictures(provenance: list[dict[str, Any]], pictures: Iterable[tuple[int, Mapping[str, Any]]], directory: Path) -> None:
    """Write ``prototypes/<j>_<kind>.png`` under ``directory`` and record the relative paths in
    the provenance entry of prototype ``j``; prototypes without pictures keep their entry as is.

    PNG encoding is most of the cost of a model's pictures and Pillow releases the GIL while it
    encodes, so the files are written by a few threads while the next pictures are drawn."""
    from concurrent.futures import ThreadPoolExecutor

    (directory / "prototypes").mkdir(parents=True, exist_ok=True)
    entries = {int(entry["prototype"]): entry for entry in provenance}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="protopnet-png") as pool:
        writes = []
        for j, drawn in pictures:
            entry = entries[int(j)]
            entry["images"] = {}
            for kind, image in drawn.items():
                relative = f"prototypes/{int(j):04d}_{kind}.png"
                writes.append(pool.submit(image.save, directory / relative, format="PNG", compress_level=PNG_COMPRESS_LEVEL,
                                          compress_type=PNG_COMPRESS_TYPE))
                entry["images"][kind] = relative
        for write in writes:
            write.result()  # the first failed write raises here: the directory is not renamed into place


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
    safe_relative_path(directory, "model.json")  # not a symlink to somewhere else
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSONDecodeError, or an int over 4300 digits
        raise CheckpointError(f"{meta_path}: not valid JSON ({' '.join(str(error).split())[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path}: JSON nested too deeply") from None
    except OSError as error:
        raise CheckpointError(f"{meta_path}: cannot read ({error.strerror or error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a protopnet model description (format != {FORMAT!r})")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{meta_path}: 'version' must be an integer, got {_brief(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer protopnet (format version {_brief(version)}); upgrade protopnet")
    if not isinstance(meta.get("kind", "protopnet"), str):
        raise CheckpointError(f"{meta_path}: 'kind' must be a string, got {_brief(meta.get('kind'))}")
    for key in ("provenance", "history"):
        if not isinstance(meta.get(key) or [], list):
            raise CheckpointError(f"{meta_path}: {key!r} must be a list, got {_brief(meta.get(key))}")
    for entry in meta.get("provenance") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("images") or {}, dict):
            raise CheckpointError(f"{meta_path}: each provenance entry must be a mapping with an 'images' mapping, got {_brief(entry)}")
        for relative in (entry.get("images") or {}).values():
            safe_relative_path(directory, relative)
    return meta


def _brief(value: Any) -> str:
    """A short repr for error messages about untrusted files."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str()
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


_MAX_IMAGE_SIZE = 16384


def _check_architecture(directory: Path, arch: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Check model.json's architecture against the (checksummed) tensors *before* building the
    network, so odd or huge values in an untrusted model.json are refused instead of making the
    loader allocate more than the tensor file holds."""
    where = f"{directory}/model.json"
    if not isinstance(arch, dict):
        raise CheckpointError(f"{where}: 'architecture' must be a mapping, got {_brief(arch)}")
    prototypes, weight = tensors.get("prototypes"), tensors.get("last_layer.weight")
    if prototypes is None or prototypes.dim() != 4 or weight is None or weight.dim() != 2 or weight.shape[1] != prototypes.shape[0]:
        raise CheckpointError(f"{directory}: the tensors lack prototypes (M, D, h, w) and a last layer (K, M)")
    m, dim, h, w = prototypes.shape

    def check(key: str, ok: bool, expected: Any) -> None:
        if key in arch and not ok:
            raise CheckpointError(f"{where}: architecture.{key} is {_brief(arch[key])}, but the tensors need {expected}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    check("num_classes", arch.get("num_classes") == weight.shape[0] and is_int(arch.get("num_classes")), weight.shape[0])
    check("prototype_dim", arch.get("prototype_dim") == dim and is_int(arch.get("prototype_dim")), dim)
    check("prototype_size", arch.get("prototype_size") == [h, w], [h, w])
    classes = arch.get("prototype_classes")
    check("prototype_classes", isinstance(classes, list) and len(classes) == m and all(is_int(c) for c in classes), f"a list of {m} class indices")
    if "prototype_classes" not in arch:
        per_class = arch.get("prototypes_per_class", 10)
        if not is_int(per_class) or per_class * arch.get("num_classes", 200) != m:
            raise CheckpointError(f"{where}: architecture.prototypes_per_class is {_brief(per_class)}, but the tensors hold {m} prototypes")
    names = arch.get("class_names")
    check("class_names", isinstance(names, list) and len(names) == weight.shape[0] and all(isinstance(n, str) for n in names), f"a list of {weight.shape[0]} strings")
    for key in ("backbone", "add_on", "activation", "distance"):
        check(key, isinstance(arch.get(key), str), "a string")
    check("epsilon", isinstance(arch.get("epsilon"), (int, float)) and not isinstance(arch.get("epsilon"), bool), "a number")


LOADERS: dict[str, Callable[[Path, dict[str, Any], str | torch.device], Any]] = {}


def register_loader(kind: str) -> Callable:
    """Register how to rebuild a model directory whose ``model.json`` says ``kind``."""

    def wrap(fn: Callable) -> Callable:
        LOADERS[kind] = fn
        return fn

    return wrap


@register_loader("protopnet")
def _load_protopnet(directory: Path, meta: dict[str, Any], device: str | torch.device) -> ProtoPNet:
    where = f"{directory}/model.json"
    files = meta.get("tensors")
    if not isinstance(files, dict) or not isinstance(files.get("sha256", ""), (str, type(None))):
        raise CheckpointError(f"{where}: 'tensors' must be a mapping with 'file' and 'sha256', got {_brief(files)}")
    image = meta.get("image", {})
    size = image.get("size", 224) if isinstance(image, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= _MAX_IMAGE_SIZE:
        raise CheckpointError(f"{where}: 'image.size' must be an integer in [1, {_MAX_IMAGE_SIZE}], got {_brief(size if isinstance(image, dict) else image)}")
    # The tensors come first (checksummed, read from inside the directory): the architecture is
    # checked against their shapes before anything is built.
    tensors = load_tensors(safe_relative_path(directory, files.get("file")), files.get("sha256"))
    arch = meta.get("architecture")
    _check_architecture(directory, arch, tensors)
    try:
        model = ProtoPNet(pretrained=False, **arch)
    except (TypeError, ValueError, KeyError, ImportError, RuntimeError) as error:
        raise CheckpointError(f"{where}: architecture does not match this protopnet ({' '.join(str(error).split())[:200]})") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{directory}: tensors do not match the architecture ({str(error).splitlines()[-1].strip()[:200]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{directory}: tensors do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.image_size = size
    model.provenance = meta.get("provenance")
    model.history = list(meta.get("history") or [])
    model.source_directory = str(directory)
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild a trained model from its directory alone (no network, no pickle).

    Args:
        path: a model directory written by :func:`save_model` (or a run directory holding one
            in ``model/``), or ``hf://OWNER/NAME[@REVISION]``: a Hugging Face Hub repository
            holding one (see :mod:`protopnet.hub`; needs ``pip install 'protopnet[hub]'``).

    Raises:
        UnsafeCheckpointError: the path is a pickle.
        CheckpointError: anything else wrong, with the reason.
    """
    if isinstance(path, str) and path.startswith("hf://"):
        from .hub import load_from_hub

        return load_from_hub(path, device)
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
    try:
        return LOADERS[kind](directory, meta, device)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a field of the wrong shape
        raise CheckpointError(f"{directory}/model.json: malformed {kind} description ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def _import_optional_loaders() -> None:
    """Modules that register more model kinds (ensembles) are imported on demand."""
    import importlib

    for name in ("protopnet.ensemble",):
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - module not present
            pass


def now_utc() -> str:
    """The current time as UTC ISO 8601 (``2024-05-01T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# -- saving --------------------------------------------------------------------------------------

def save_edited_model(
    model: ProtoPNet,
    directory: str | Path,
    *,
    pictures: Mapping[int, Mapping[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save an edited (or pruned) model as a model directory, atomically.

    Prototype pictures follow their prototypes: those of unchanged prototypes are copied from
    the directory the model was loaded from and renamed to their new index
    (``prototypes/<new>_<kind>.png``); ``pictures`` (new index -> {kind: PIL picture}) gives
    the pictures of replaced prototypes. The source's ``config.yaml`` (the run that trained it)
    is kept.
    """
    source = Path(model.source_directory) if getattr(model, "source_directory", None) else None
    pictures = dict(pictures or {})
    staging = Path(tempfile.mkdtemp(prefix=".protopnet-edit-"))
    try:
        if model.provenance is not None:
            (staging / "prototypes").mkdir()
            for new, entry in enumerate(model.provenance):
                if entry is None:
                    continue
                images = dict(entry.get("images") or {})
                entry.pop("images", None)
                written = {}
                if new in pictures:
                    for kind, picture in pictures[new].items():
                        relative = f"prototypes/{new:04d}_{kind}.png"
                        picture.save(staging / relative)
                        written[kind] = relative
                elif source is not None:
                    for kind, relative in images.items():
                        try:
                            src = safe_relative_path(source, relative)
                        except CheckpointError:
                            continue
                        if src.is_file():
                            target = f"prototypes/{new:04d}_{kind}.png"
                            shutil.copyfile(src, staging / target)
                            written[kind] = target
                if written:
                    entry["images"] = written
        run_config = None
        if source is not None and (source / "config.yaml").is_file():
            import yaml

            try:
                run_config = yaml.safe_load((source / "config.yaml").read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as error:
                logger.warning("not keeping %s/config.yaml: %s", source, error)
        merged = dict(_source_extra(source))
        merged.update(extra or {})
        model.source_directory = str(staging)
        try:
            return save_model(model, directory, run_config=run_config, extra=merged or None)
        except BaseException:
            model.source_directory = str(source) if source is not None else None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _source_extra(source: Path | None) -> dict[str, Any]:
    """The ``extra`` section of the source model's ``model.json`` (metrics of the run), if any."""
    if source is None or not (source / "model.json").is_file():
        return {}
    import json

    try:
        extra = json.loads((source / "model.json").read_text(encoding="utf-8")).get("extra")
    except (OSError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}
