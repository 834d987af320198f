"""The Hugging Face Hub: load a model directory from a repository, publish one to a repository.

A Hub repository holds the same files as a model directory — ``model.safetensors``,
``model.json``, ``config.yaml``, ``prototypes/*.png``, ``README.md`` (the model card), and
``members/<i>/`` for an ensemble — and nothing else is fetched or sent. Needs the optional extra
``pip install 'protopnet[hub]'`` (``huggingface_hub``).

    >>> model = protopnet.load_model("hf://OWNER/NAME")            # or hf://OWNER/NAME@REVISION
    >>> model = protopnet.ProtoPNet.from_pretrained("OWNER/NAME")
    >>> protopnet.hub.push_to_hub("runs/cub/model", "OWNER/NAME")   # protopnet push-to-hub MODEL OWNER/NAME

Loading goes through ``huggingface_hub``'s cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` loads
from it without a network). A repository is refused, with one line, when it holds a pickle
(``.bin``, ``.pt``, ``.pth``, ``.pkl``..., or a file that starts like one), when one of its files
or a path inside its ``model.json`` leads outside it, or when ``model.safetensors`` does not
match the SHA-256 in ``model.json``. The checked files are copied into a plain model directory
under ``$PROTOPNET_CACHE/hub/`` (default ``~/.cache/protopnet/hub/``) and loaded from there by
:func:`protopnet.load_model`, with every check a local directory gets.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .atomic_files import write_directory_atomically
from .checkpoint import (
    PICKLE_SUFFIXES,
    CheckpointError,
    UnsafeCheckpointError,
    load_model,
    read_metadata,
    refuse_pickle,
)

logger = logging.getLogger(__name__)

PREFIX = "hf://"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")

MODEL_FILES = ("model.json", "model.safetensors", "config.yaml", "README.md", "pruning.json")
# what snapshot_download may fetch (fnmatch patterns: '*' crosses '/'); is_model_file decides
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.yaml", "*.md", "*.png"]
INSTALL_HINT = "the Hugging Face Hub needs the optional extra: pip install 'protopnet[hub]'"


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - submodules the package loads lazily
        import huggingface_hub.utils  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return huggingface_hub


def is_hub_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_repo_id(repo_id: str) -> str:
    """Check ``OWNER/NAME``; returns it."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id: expected OWNER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf://OWNER/NAME[@REVISION]`` -> (``OWNER/NAME``, revision or None)."""
    if not is_hub_spec(spec):
        raise CheckpointError(f"{spec!r} is not a Hub model: expected hf://OWNER/NAME[@REVISION]")
    body = spec[len(PREFIX):]
    repo_id, at, revision = body.partition("@")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise CheckpointError(f"{spec!r}: revision {revision!r} is not a branch, tag or commit name")
    try:
        parse_repo_id(repo_id)
    except CheckpointError:
        raise CheckpointError(f"{spec!r} is not a Hub model: expected hf://OWNER/NAME[@REVISION]") from None
    return repo_id, (revision if at else None)


def is_model_file(relative: str) -> bool:
    """Whether a file (path relative to the model directory, '/'-separated) belongs to the model
    directory format: the files in :data:`MODEL_FILES` (at the top or in an ensemble's
    ``members/<i>/``) and the PNG pictures in a ``prototypes/`` folder."""
    path = PurePosixPath(relative)
    if any(part.startswith(".") for part in path.parts):
        return False  # .gitattributes, leftovers of interrupted writes
    if len(path.parts) > 1 and path.parts[0] != "members" and path.parent.name != "prototypes":
        return False
    return path.name in MODEL_FILES or (path.suffix.lower() == ".png" and path.parent.name == "prototypes")


def check_file_names(names: Iterable[str], where: str) -> list[str]:
    """The model files among a repository's ``names``; refuses the whole repository when one of
    them is a pickle or a path that leads outside it."""
    keep = []
    for name in names:
        path = PurePosixPath(name)
        if not name or name.startswith("/") or "\\" in name or ".." in path.parts or re.match(r"[A-Za-z]:", name):
            raise CheckpointError(f"{where}: file {name!r} has a path outside the repository; refused")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointError(f"{where}: holds {name}, a pickle; refused (loading a pickle can run code; "
                                        "a protopnet model is safetensors + JSON)")
        if is_model_file(name):
            keep.append(name)
    return keep


# -- loading ------------------------------------------------------------------------------------

def hub_model_cache() -> Path:
    """Where checked copies of Hub snapshots live: ``$PROTOPNET_CACHE/hub`` (default
    ``$XDG_CACHE_HOME/protopnet/hub``, ``~/.cache/protopnet/hub``)."""
    root = os.environ.get("PROTOPNET_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "protopnet")
    return Path(root).expanduser() / "hub"


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def download(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
             local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """Fetch a repository's model files into ``huggingface_hub``'s cache; returns the snapshot
    folder. Online, the repository's file list is checked first, so nothing of a refused
    repository is downloaded."""
    from . import __version__

    hub = _hub()
    where = PREFIX + repo_id + (f"@{revision}" if revision else "")
    offline = bool(local_files_only or hub.constants.HF_HUB_OFFLINE)
    hint = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if offline and not local_files_only else ""
    if not offline:
        try:
            names = hub.HfApi(token=token).list_repo_files(repo_id, revision=revision)
        except hub.utils.HfHubHTTPError as error:  # not found, gated, no such revision
            raise CheckpointError(f"{where}: cannot fetch: {type(error).__name__}: {_reason(error)}") from None
        except Exception as error:  # noqa: BLE001 - no connection: the local cache may hold it (checked on use)
            logger.warning("%s: the Hub cannot be reached (%s); looking in the local cache", where, type(error).__name__)
        else:
            check_file_names(names, where)
    try:
        snapshot = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            allow_patterns=ALLOW_PATTERNS, library_name="protopnet", library_version=__version__,
        )
    except Exception as error:  # noqa: BLE001 - not found, not cached offline, network: one line
        raise CheckpointError(f"{where}: cannot fetch{hint}: {type(error).__name__}: {_reason(error)}") from None
    return Path(snapshot)


def materialise(snapshot: str | Path, repo_id: str, where: str) -> Path:
    """Check a snapshot folder of ``huggingface_hub``'s cache and copy its model files into a
    plain model directory under :func:`hub_model_cache` (replaced atomically); returns it.

    Refused: a pickle (by name or by content), a file or folder that is a link leading out of
    the repository's cache folder, and a snapshot without ``model.json``."""
    snapshot = Path(snapshot)
    storage = snapshot.parent.parent.resolve()  # models--OWNER--NAME: blobs/, refs/, snapshots/
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(snapshot):
        for name in dirs:
            if Path(root, name).is_symlink():
                rel = Path(root, name).relative_to(snapshot).as_posix()
                raise CheckpointError(f"{where}: folder {rel!r} is a link; refused (a path outside the repository)")
        for name in files:
            path = Path(root, name)
            found[path.relative_to(snapshot).as_posix()] = path
    keep = check_file_names(sorted(found), where)
    for rel in sorted(found):
        real = found[rel].resolve()
        if real != storage and storage not in real.parents:
            raise CheckpointError(f"{where}: {rel} leads outside the repository (to {real}); refused")
        try:
            refuse_pickle(found[rel])
        except UnsafeCheckpointError:
            raise UnsafeCheckpointError(f"{where}: {rel} is a pickle (it starts like one); refused (loading a pickle can run code)") from None
    if "model.json" not in keep:
        raise CheckpointError(f"{where}: not a protopnet model (the repository has no model.json)")
    skipped = sorted(set(found) - set(keep))
    if skipped:
        logger.info("%s: not part of a model directory, left out: %s", where, ", ".join(skipped))

    def fill(tmp: Path) -> None:
        for rel in keep:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found[rel], target)

    owner, name = repo_id.split("/")
    return write_directory_atomically(hub_model_cache() / f"models--{owner}--{name}" / snapshot.name, fill)


def load_from_hub(spec: str, device: Any = "cpu", *, cache_dir: str | Path | None = None,
                  local_files_only: bool = False, token: str | bool | None = None) -> Any:
    """Load ``hf://OWNER/NAME[@REVISION]`` (see the module docstring for what is checked)."""
    repo_id, revision = parse_hub_spec(spec)
    where = spec
    snapshot = download(repo_id, revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    directory = materialise(snapshot, repo_id, where)
    try:
        model = load_model(directory, device=device)
    except CheckpointError as error:
        message = str(error).replace(str(directory), where)
        if where not in message:
            message = f"{where}: {message}"
        raise type(error)(message) from None
    model.hub_commit = snapshot.name
    logger.info("loaded %s (commit %s) from %s", where, snapshot.name, directory)
    return model


def load_pretrained(name_or_path: str | Path, device: Any = "cpu", *, revision: str | None = None, **hub_kwargs: Any) -> Any:
    """A model directory on this machine, ``hf://OWNER/NAME[@REVISION]``, or ``OWNER/NAME`` (a
    Hub repository when no such local directory exists)."""
    text = str(name_or_path)
    if not is_hub_spec(text) and (Path(text).expanduser().exists() or not _REPO_ID.fullmatch(text)):
        if revision is not None:
            raise CheckpointError(f"{text}: a revision ({revision!r}) applies to Hub repositories, not to a local directory")
        return load_model(Path(text).expanduser(), device=device)
    spec = text if is_hub_spec(text) else PREFIX + text
    if revision is not None:
        if "@" in spec:
            raise CheckpointError(f"{text}: give the revision once (in the name or as revision=), not both")
        spec += f"@{revision}"
    return load_from_hub(spec, device, **hub_kwargs)


# -- publishing ---------------------------------------------------------------------------------

def upload_operations(model_dir: str | Path, *, repo_id: str | None = None, license: str | None = None) -> list[Any]:
    """The files a push sends, as ``huggingface_hub.CommitOperationAdd`` objects (sorted by path).

    The directory must load (checksums, no pickles, paths inside it); its model files go as they
    are, except ``README.md``, which is rendered afresh for the repository (its usage snippet
    names ``hf://repo_id``; ``license`` goes into its front matter). Anything else in the
    directory (reports, leftovers) stays behind, logged; a pickle in it refuses the push."""
    from .model_card import render_model_card

    hub = _hub()
    directory = Path(model_dir)
    load_model(directory)  # nothing that would be refused on loading gets published
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink() or _inside(Path(root, d), directory)]
        for name in files:
            path = Path(root, name)
            found[path.relative_to(directory).as_posix()] = path
    try:
        keep = check_file_names(sorted(found), str(directory))
        for rel in keep:
            refuse_pickle(found[rel])
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{error}; not publishing it") from None
    for rel in keep:
        if not _inside(found[rel], directory):
            raise CheckpointError(f"{directory}: {rel} is a link to a file outside the model directory; not publishing it")
    left = sorted(set(found) - set(keep))
    if left:
        logger.info("%s: not part of the model directory format, not uploaded: %s", directory, ", ".join(left))
    card = render_model_card(directory, repo_id=repo_id, license=license).encode("utf-8")
    operations = [hub.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(found[rel])) for rel in keep if rel != "README.md"]
    operations.append(hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    return sorted(operations, key=lambda op: op.path_in_repo)


def _inside(path: Path, directory: Path) -> bool:
    real, root = path.resolve(), directory.resolve()
    return real == root or root in real.parents


def commit_message(model_dir: str | Path) -> tuple[str, str]:
    """(title, description) of the commit that publishes ``model_dir``."""
    from . import __version__

    meta = read_metadata(model_dir)
    if meta.get("kind") == "ensemble":
        title = f"protopnet {__version__}: an ensemble of {len(meta.get('members') or [])} ProtoPNets, {meta.get('num_classes')} classes"
    else:
        arch = meta.get("architecture") or {}
        title = (f"protopnet {__version__}: ProtoPNet on {arch.get('backbone')}, {len(arch.get('prototype_classes') or [])} prototypes, "
                 f"{arch.get('num_classes')} classes")
    tensors = meta.get("tensors") if isinstance(meta.get("tensors"), dict) else {}
    description = "Uploaded with `protopnet push-to-hub`." + (f" model.safetensors SHA-256: {tensors['sha256']}" if tensors.get("sha256") else "")
    return title, description


def push_to_hub(model_dir: str | Path, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                license: str | None = None, message: str | None = None, create_pr: bool = False,
                token: str | bool | None = None) -> Any:
    """Publish a model directory to the Hub repository ``repo_id`` (created when missing) in one
    commit: the files of :func:`upload_operations`, and the deletion of model files a previous
    push left that this directory no longer has (pictures of pruned prototypes, say). Other files
    in the repository stay. Returns ``huggingface_hub``'s ``CommitInfo``."""
    from . import __version__

    hub = _hub()
    repo_id = parse_repo_id(repo_id[len(PREFIX):] if is_hub_spec(repo_id) else repo_id)
    operations = upload_operations(model_dir, repo_id=repo_id, license=license)
    title, description = commit_message(model_dir)
    api = hub.HfApi(token=token, library_name="protopnet", library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except (hub.utils.RevisionNotFoundError, hub.utils.EntryNotFoundError):
        existing = []
    sent = {op.path_in_repo for op in operations}
    stale = [hub.CommitOperationDelete(path_in_repo=path) for path in sorted(existing) if path not in sent and is_model_file(path)]
    info = api.create_commit(repo_id, operations=operations + stale, commit_message=message or title,
                             commit_description=description, revision=revision, create_pr=create_pr)
    logger.info("pushed %s to %s: %d files, %d stale files deleted", model_dir, repo_id, len(operations), len(stale))
    return info
