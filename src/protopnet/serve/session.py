"""What the server does with its one model, free of any web framework.

:class:`ModelSession` holds the served model (never changed in place), explains pictures with
:func:`protopnet.explain.local.explain`, renders them with the HTML report's own functions,
builds the prototype gallery with :func:`protopnet.explain.write_analysis_report`, and edits
copies of the model with :func:`protopnet.edit.edit_model` (what ``protopnet edit`` runs), keeping
each edited copy as a *draft* until it is saved with :func:`protopnet.edit.save_edited_model`.

Only two kinds of place are ever written: temporary files and directories the session makes
itself, and new model directories whose names it makes, under ``save_root``. No name or path
from a request is used to reach the file system.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .uploads import RequestError

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)

MAX_REASON = 500
PICTURE_KINDS = ("patch", "source")


@dataclass
class Draft:
    """An edited copy of the served model, not yet saved.

    Attributes:
        id: the name requests use for it (random, 16 hex digits).
        model: the edited copy.
        report: the :class:`protopnet.edit.EditReport` of the edit.
        reasons: prototype index (before the edit) -> why the person changed it.
    """

    id: str
    model: ProtoPNet
    report: Any
    reasons: dict[int, str]
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out = {"draft": self.id, **self.report.to_json()}
        out["reasons"] = {str(j): text for j, text in self.reasons.items()}
        out["prototypes"] = int(self.model.num_prototypes)
        return out


class ModelSession:
    """The served model and everything the pages and the API ask of it.

    Args:
        model: a loaded ProtoPNet (or ensemble: explanations only).
        directory: the model directory it was loaded from.
        train, test: the datasets of ``--data`` (prepared for the model), or None: editing and the
            nearest patches of the gallery need ``train``; accuracy needs ``test``.
        save_root: where edited models are saved (default: the model directory's parent).
        gallery_k: nearest patches per prototype in the gallery.
        max_drafts: edited copies kept in memory at most (the oldest is dropped).
    """

    def __init__(
        self,
        model: ProtoPNet | Ensemble,
        directory: str | os.PathLike[str],
        *,
        train: Any = None,
        test: Any = None,
        save_root: str | os.PathLike[str] | None = None,
        gallery_k: int = 5,
        max_drafts: int = 4,
        batch_size: int = 64,
    ) -> None:
        from ..model_card import display_name

        model.eval()
        self.model = model
        self.directory = Path(directory).resolve()
        self.name = display_name(self.directory)
        self.train, self.test = train, test
        self.save_root = Path(save_root).resolve() if save_root is not None else self.directory.parent
        self.gallery_k = int(gallery_k)
        self.max_drafts = int(max_drafts)
        self.batch_size = int(batch_size)
        self._infer = threading.Lock()  # one forward pass at a time: the CPU threads are shared anyway
        self._edit = threading.Lock()
        self._save = threading.Lock()
        self._gallery_lock = threading.Lock()
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self._gallery: dict[str, bytes] | None = None
        self._pictures: list[dict[str, Path]] | None = None
        self.started = time.time()
        self.explained = 0

    # -- facts ----------------------------------------------------------------------------------
    @property
    def editable(self) -> bool:
        """Whether prototypes can be edited here: a single ProtoPNet, and training data given."""
        return self.train is not None and hasattr(self.model, "prototypes")

    @property
    def num_prototypes(self) -> int:
        return int(getattr(self.model, "num_prototypes", 0) or sum(m.num_prototypes for m in getattr(self.model, "members", [])))

    def info(self) -> dict[str, Any]:
        """The model as ``GET /api/model`` gives it: classes, prototypes (class, source), and
        provenance (architecture, image settings, history of edits, training config file)."""
        model = self.model
        names = list(model.class_names)
        out: dict[str, Any] = {
            "name": self.name,
            "kind": "protopnet" if hasattr(model, "prototypes") else "ensemble",
            "classes": names,
            "num_classes": len(names),
            "num_prototypes": self.num_prototypes,
            "image": {"size": int(getattr(model, "image_size", 224)), "mean": list(model.mean), "std": list(model.std)},
            "editable": self.editable,
        }
        if hasattr(model, "prototypes"):
            provenance = getattr(model, "provenance", None) or []
            prototypes = []
            weight = model.last_layer.weight.detach().float().cpu()  # (K, M)
            for j, k in enumerate(model.prototype_classes.tolist()):
                entry: dict[str, Any] = {"prototype": j, "class_index": int(k), "class_name": names[int(k)],
                                         "weight": float(weight[int(k), j])}
                source = provenance[j] if j < len(provenance) and provenance[j] else None
                if source:
                    entry["source"] = {key: source.get(key) for key in ("path", "dataset_index", "box", "position", "distance", "source") if key in source}
                prototypes.append(entry)
            out["prototypes"] = prototypes
            out["architecture"] = model.config() if hasattr(model, "config") else None
            out["history"] = list(getattr(model, "history", None) or [])
        return out

    def prototype_picture_kinds(self) -> list[list[str]]:
        """For each prototype, which of its pictures (``patch``, ``source``) the model directory
        holds."""
        if self._pictures is None:
            from .report_parts import prototype_files

            provenance = getattr(self.model, "provenance", None) or []
            self._pictures = [
                {kind: path for kind, path in prototype_files(provenance[j] if j < len(provenance) else None,
                                                              getattr(self.model, "source_directory", None)).items()
                 if kind in PICTURE_KINDS}
                for j in range(getattr(self.model, "num_prototypes", 0))
            ]
        return [sorted(files) for files in self._pictures]

    def prototype_picture(self, j: int, kind: str) -> bytes | None:
        """The PNG bytes of prototype ``j``'s ``kind`` picture, or None. ``j`` and ``kind`` only
        select among the files the model's own provenance names."""
        self.prototype_picture_kinds()
        assert self._pictures is not None
        if kind not in PICTURE_KINDS or not 0 <= j < len(self._pictures) or kind not in self._pictures[j]:
            return None
        try:
            return self._pictures[j][kind].read_bytes()
        except OSError as error:
            logger.warning("cannot read prototype %d's %s picture: %s", j, kind, error)
            return None

    # -- explanations -----------------------------------------------------------------------------
    def explain(self, picture: Any, top_classes: int = 3, top_prototypes: int = 10) -> Any:
        """The :class:`protopnet.explain.Explanation` of a PIL picture."""
        from ..explain.local import explain

        k = len(self.model.class_names)
        with self._infer:
            explanation = explain(self.model, picture, top_classes=min(top_classes, k), top_prototypes=top_prototypes)
            self.explained += 1
        return explanation

    @staticmethod
    def report_html(explanation: Any, picture_rows: int = 10) -> str:
        """The explanation as ``protopnet explain``'s report shows it (score sheets, most
        activated prototypes, how to read), made by the report's own code, pictures embedded."""
        from .report_parts import explanation_fragment

        return explanation_fragment(explanation, picture_rows)

    # -- the gallery --------------------------------------------------------------------------------
    def gallery_files(self) -> dict[str, bytes] | None:
        """The analysis report (``index.html`` and its pictures, by relative name) of the
        prototypes' nearest training and test patches, built on first use and kept in memory;
        None without training data or for an ensemble."""
        if self.train is None or not hasattr(self.model, "prototypes"):
            return None
        with self._gallery_lock:
            if self._gallery is None:
                from ..explain import analyze, write_analysis_report

                started = time.perf_counter()
                splits = {"train": self.train} if self.test is None else {"train": self.train, "test": self.test}
                with self._infer:
                    analysis = analyze(self.model, splits, k=self.gallery_k, batch_size=self.batch_size)
                folder = Path(tempfile.mkdtemp(prefix="protopnet-gallery-"))
                try:
                    write_analysis_report(analysis, folder, title=f"Prototypes of {self.name}")
                    files = {}
                    for path in folder.rglob("*"):
                        if path.is_file():
                            files[path.relative_to(folder).as_posix()] = path.read_bytes()
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                self._gallery = files
                logger.info("gallery of %d prototypes built in %.1f s", self.model.num_prototypes, time.perf_counter() - started)
        return self._gallery

    # -- edits ----------------------------------------------------------------------------------------
    def edit(
        self,
        remove: Sequence[Any] = (),
        relabel: Mapping[Any, Any] | None = None,
        reasons: Mapping[Any, Any] | None = None,
        iterations: int = 20,
    ) -> Draft:
        """Edit a copy of the served model (remove / relabel prototypes, re-fit the last layer for
        ``iterations`` passes, 0 for none), measure accuracy before and after, keep it as a draft.

        Every edited prototype needs a reason; the reasons go into the edit's history entry.

        Raises:
            RequestError: 409 when editing is not possible here, 400 naming a bad value.
        """
        if not self.editable:
            raise RequestError(409, "editing needs a single ProtoPNet and its training data: start the server with --data DIR")
        model = self.model
        names = list(model.class_names)
        remove_idx = [_index(j, "remove") for j in remove]
        relabel_map = {_index(j, "relabel"): _class_index(k, names) for j, k in dict(relabel or {}).items()}
        why = {_index(j, "reasons"): " ".join(str(text).split())[:MAX_REASON] for j, text in dict(reasons or {}).items()}
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not 0 <= iterations <= 1000:
            raise RequestError(400, f"iterations must be an integer from 0 to 1000, got {iterations!r}")
        edited = sorted(set(remove_idx) | set(relabel_map))
        if not edited:
            raise RequestError(400, "nothing to edit: choose prototypes to remove or relabel")
        missing = [j for j in edited if not why.get(j)]
        if missing:
            raise RequestError(400, f"give a reason for prototype(s) {', '.join(map(str, missing))}: the model's history records why it was changed")
        from ..edit import edit_model

        with self._edit:
            draft_model = copy.deepcopy(model)
            try:
                report = edit_model(
                    draft_model, self.train, remove=remove_idx, relabel=relabel_map, test_dataset=self.test,
                    refit=iterations > 0, iterations=max(iterations, 1), batch_size=self.batch_size,
                )
            except (ValueError, IndexError) as error:  # PrototypeIndexError is a ValueError
                raise RequestError(400, str(error)) from None
        report.event["reasons"] = {str(j): why[j] for j in edited}
        report.event["tool"] = "protopnet serve"
        draft = Draft(secrets.token_hex(8), draft_model, report, {j: why[j] for j in edited})
        self._drafts[draft.id] = draft
        while len(self._drafts) > self.max_drafts:
            dropped, _ = self._drafts.popitem(last=False)
            logger.info("draft %s dropped (at most %d kept)", dropped, self.max_drafts)
        logger.info("draft %s: removed %s, relabelled %s; test accuracy %s -> %s", draft.id, report.removed,
                    report.relabelled, report.accuracy_before.get("test"), report.accuracy_after.get("test"))
        return draft

    def draft(self, draft_id: Any) -> Draft:
        draft = self._drafts.get(str(draft_id)) if isinstance(draft_id, str) else None
        if draft is None:
            raise RequestError(404, "no such edit: it was saved already, replaced by newer edits, or the server restarted")
        return draft

    def save(self, draft_id: Any) -> Path:
        """Save a draft as a new model directory under ``save_root`` (a fresh name made here,
        ``<model>-edited-<UTC time>``); the draft is then forgotten."""
        from ..edit import save_edited_model

        with self._save:
            draft = self.draft(draft_id)
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            base = f"{_safe_stem(self.name)}-edited-{stamp}"
            target, n = self.save_root / base, 1
            while target.exists():
                n += 1
                target = self.save_root / f"{base}-{n}"
            self.save_root.mkdir(parents=True, exist_ok=True)
            path = save_edited_model(draft.model, target, pictures=draft.report.pictures)
            self._drafts.pop(draft.id, None)
        logger.info("draft %s saved as %s", draft.id, path)
        return Path(path)


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return stem[:60] or "model"


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise RequestError(400, f"{what}: {value!r} is not a prototype index")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{what}: {str(value)[:40]!r} is not a prototype index (a whole number)") from None
    return number


def _class_index(value: Any, names: list[str]) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, bool):
        raise RequestError(400, f"relabel: {value!r} is not a class")
    try:
        k = int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"relabel: {str(value)[:40]!r} is not a class (an index 0..{len(names) - 1} or a class name)") from None
    if not 0 <= k < len(names):
        raise RequestError(400, f"relabel: class {k} is out of range (0..{len(names) - 1})")
    return k
