"""The model card: ``README.md`` in every model directory, generated from what the directory holds.

The card is what a person reads before using a model, on disk or on the Hugging Face Hub. It is
written by every save (train, push, prune, edit, ensemble, :func:`protopnet.checkpoint.save_model`)
and regenerated, never edited by hand: its sources are ``model.json`` (architecture, classes,
provenance of the prototypes, history, recorded evaluations), ``config.yaml`` (the run config)
and the pictures in ``prototypes/``.

It starts with YAML front matter as Hub model cards use it (``library_name``, ``tags``,
``datasets``, ``metrics``, ``base_model`` where the backbone's pretrained weights are on the Hub,
``model-index`` with the recorded test accuracy); ``license`` is left to whoever publishes the
model (``protopnet push-to-hub --license``). Then, in words and tables: the classes, the data and
the protocol, the config, the accuracy, the interpretability figures when they were measured, a
few prototypes with their source patches, the pruning and edit history, intended use and limits.

An evaluation is recorded with :func:`record_evaluation` together with the SHA-256 of the tensors
it measured: a model edited or pruned afterwards keeps the record, and its card says the figure
belongs to the model before the change instead of passing it off as the new model's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"

PAPER = "https://arxiv.org/abs/1806.10574"
CITATION = """@inproceedings{chen2019looks,
  title     = {This Looks Like That: Deep Learning for Interpretable Image Recognition},
  author    = {Chen, Chaofan and Li, Oscar and Tao, Daniel and Barnett, Alina and Rudin, Cynthia and Su, Jonathan K.},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2019}
}"""

# Hub repositories that hold exactly the ImageNet weights torchvision loads (IMAGENET1K_V1):
# timm's "tv_in1k" copies. torchvision's MobileNetV2 weights have no copy on the Hub, and the Hub
# refuses a base_model that names no repository, so that backbone is named in the text only.
_TORCHVISION_ON_HUB = {
    **{name: f"timm/{name}.tv_in1k" for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{name: f"timm/{name}.tv_in1k" for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
    **{name: f"timm/{name}.tv_in1k" for name in ("densenet121", "densenet161", "densenet169", "densenet201")},
}

_DATASETS = {"cub200": ("CUB-200-2011", "cub-200-2011"), "cars": ("Stanford Cars", "stanford-cars"),
             "synthetic": ("protopnet's built-in synthetic glyphs", "protopnet-synthetic"),
             "folder": ("an ImageFolder tree", None)}

PROTOTYPES_SHOWN = 8
CLASSES_LISTED = 40


# -- reading the directory ----------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        logger.warning("%s: not used in the model card (%s)", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def dataset_kind(root: Any) -> str:
    """``synthetic``, ``cub200``, ``cars`` or ``folder`` for a config's ``data.root`` (recognised by
    the files the directory holds, as :func:`protopnet.data.build_dataset` does; ``folder`` when
    the directory is not on this machine)."""
    if not isinstance(root, str) or not root:
        return "folder"
    if root == "synthetic":
        return "synthetic"
    from .data import is_cars_root, is_cub_root

    path = Path(root).expanduser()
    try:
        if any(is_cub_root(p) for p in (path, path / "CUB_200_2011")):
            return "cub200"
        if any(is_cars_root(p) for p in (path, path / "stanford_cars")):
            return "cars"
    except OSError:
        pass
    name = path.name.lower()
    if "cub" in name:
        return "cub200"
    if "car" in name:
        return "cars"
    return "folder"


def _dataset(config: dict[str, Any]) -> tuple[str, str | None]:
    """(name in words, Hub-style dataset id or None) of the training data."""
    root = _section(config, "data").get("root")
    if not config:
        return "unknown data (the directory holds no config.yaml)", None
    kind = dataset_kind(root)
    words, slug = _DATASETS[kind]
    if kind == "folder" and isinstance(root, str) and root:
        folder = PurePosixPath(root.replace("\\", "/")).name or root
        return f"{words} ({folder})", folder.lower().replace(" ", "-")
    return words, slug


def _base_model(arch: dict[str, Any], config: dict[str, Any]) -> tuple[str | None, str]:
    """(Hub id of the backbone's pretrained weights or None, the weights in words)."""
    backbone = str(arch.get("backbone", "?"))
    pretrained = _section(config, "model").get("pretrained")
    if not config:
        return None, f"`{backbone}` (whether it started from pretrained weights is not recorded: no config.yaml)"
    if backbone.startswith("tiny_cnn") or not pretrained:
        return None, f"`{backbone}`, trained from scratch (no pretrained weights)"
    if backbone.startswith("timm/"):
        return backbone, f"`{backbone}` with timm's pretrained weights ([{backbone}](https://huggingface.co/{backbone}))"
    hub = _TORCHVISION_ON_HUB.get(backbone)
    words = f"`{backbone}` with torchvision's ImageNet weights (`IMAGENET1K_V1`)"
    if hub:
        words += f"; the same weights on the Hub: [{hub}](https://huggingface.co/{hub})"
    return hub, words


def _tensor_digest(meta: dict[str, Any]) -> str | None:
    tensors = meta.get("tensors")
    return tensors.get("sha256") if isinstance(tensors, dict) else None


def _fraction(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "—"
    return f"{100 * value:.1f} %"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def display_name(directory: str | Path) -> str:
    """The name a model directory goes by: its folder name, or the run's for ``RUN/model``."""
    path = Path(directory).resolve()
    if path.name == "model" and path.parent.name:
        return path.parent.name
    return path.name or "protopnet-model"


# -- evaluations --------------------------------------------------------------------------------

def record_evaluation(directory: str | Path, figures: dict[str, dict[str, Any]]) -> None:
    """Keep evaluations in ``model.json`` (``extra.evaluation.<key>``, replacing an earlier one of
    the same key) with the SHA-256 of the tensors they measured and the time, then regenerate the
    card. ``figures`` maps a key (``test``, ``validation``, ``interpretability``, ...) to JSON
    figures (``accuracy``, ``top5``, ``n``, ``split``, ``data``...). Each file is replaced atomically."""
    from .atomic_files import atomic_write_json
    from .checkpoint import read_metadata

    directory = Path(directory)
    meta = read_metadata(directory)
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    evaluation = extra.get("evaluation") if isinstance(extra.get("evaluation"), dict) else {}
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, values in figures.items():
        evaluation[key] = {**values, "tensors_sha256": _tensor_digest(meta), "when": when}
    extra["evaluation"] = evaluation
    meta["extra"] = extra
    atomic_write_json(directory / "model.json", meta)
    write_model_card(directory)


def record_training_results(directory: str | Path, results: dict[str, Any], data: str | None = None) -> None:
    """Record a run's ``results.json`` figures (the selected model's validation and test accuracy)
    in its model directory, so the card and the Hub show them."""
    figures = {}
    for key in ("test", "validation"):
        report = results.get(key)
        if isinstance(report, dict) and "accuracy" in report:
            figures[key] = {"split": key, "data": data, "n": report.get("n"), "accuracy": report.get("accuracy"),
                            "top5": report.get("top5"), "per_class": report.get("per_class"),
                            "selected_step": results.get("selected_step")}
    if figures:
        record_evaluation(directory, figures)


def _evaluations(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(evaluations of these tensors, evaluations of an earlier version of the model)."""
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    evaluation = extra.get("evaluation") if isinstance(extra.get("evaluation"), dict) else {}
    digest = _tensor_digest(meta)
    current, earlier = {}, {}
    for key, figures in evaluation.items():
        if isinstance(figures, dict):
            (current if figures.get("tensors_sha256") == digest else earlier)[key] = figures
    return current, earlier


# -- the card -----------------------------------------------------------------------------------

def front_matter(directory: str | Path, *, name: str | None = None, license: str | None = None) -> dict[str, Any]:
    """The YAML front matter of the card, as a dict (keys as the Hub reads them)."""
    from . import __version__

    directory = Path(directory)
    meta = _read_json(directory / "model.json")
    config = _read_config(directory)
    kind = meta.get("kind", "protopnet")
    data: dict[str, Any] = {"library_name": "protopnet"}
    if license:
        data["license"] = license
    dataset_words, dataset_slug = _dataset(config)
    data["tags"] = ["protopnet", "prototypical-part-network", "interpretability", "explainable-ai", "image-classification", "safetensors"]
    if kind == "ensemble":
        data["tags"].append("ensemble")
    if dataset_slug:
        data["datasets"] = [dataset_slug]
    data["metrics"] = ["accuracy"]
    data["pipeline_tag"] = "image-classification"
    if kind != "ensemble":
        hub, _ = _base_model(meta.get("architecture") or {}, config)
        if hub:
            data["base_model"] = hub
    current, _ = _evaluations(meta)
    test = current.get("test")
    if isinstance(test, dict) and isinstance(test.get("accuracy"), (int, float)) and not isinstance(test.get("accuracy"), bool):
        metrics = [{"type": "accuracy", "value": float(test["accuracy"]), "name": "top-1 accuracy"}]
        if isinstance(test.get("top5"), (int, float)) and not isinstance(test.get("top5"), bool):
            metrics.append({"type": "top_5_accuracy", "value": float(test["top5"]), "name": "top-5 accuracy"})
        data["model-index"] = [{
            "name": name or display_name(directory),
            "results": [{
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"name": dataset_words, "type": dataset_slug or "imagefolder", "split": str(test.get("split", "test"))},
                "metrics": metrics,
            }],
        }]
    data["protopnet_version"] = __version__
    return data


def render_model_card(directory: str | Path, *, name: str | None = None, repo_id: str | None = None, license: str | None = None) -> str:
    """The card's text for the model directory ``directory``.

    Args:
        name: what to call the model (default: :func:`display_name`).
        repo_id: the Hub repository it is published as (the usage snippet loads it from there).
        license: the ``license`` of the front matter (left out when None: the publisher's choice).
    """
    import yaml

    directory = Path(directory)
    meta = _read_json(directory / "model.json")
    config = _read_config(directory)
    name = name or (repo_id.split("/")[-1] if repo_id else display_name(directory))
    head = yaml.safe_dump(front_matter(directory, name=repo_id or name, license=license), sort_keys=False, allow_unicode=True)
    kind = meta.get("kind", "protopnet")
    parts = [f"---\n{head}---\n", f"# {name}\n"]
    if kind == "ensemble":
        parts += _ensemble_summary(directory, meta)
    else:
        parts += _summary(meta, config)
    parts += _usage(directory, repo_id)
    if kind == "ensemble":
        parts += _members(directory, meta)
    else:
        parts += _architecture(meta, config)
    parts += _classes(directory, meta)
    parts += _data_and_protocol(config)
    parts += _results(meta)
    if kind != "ensemble":
        parts += _prototypes(directory, meta)
    parts += _history(meta)
    parts += _intended_use(meta, config)
    parts += _files(directory, meta)
    parts += ["## Citation\n", f"```bibtex\n{CITATION}\n```\n",
              "*This card is generated by protopnet from `model.json` and `config.yaml` each time the model is saved "
              "or recorded; edits by hand are overwritten.*\n"]
    return "\n".join(parts)


def write_model_card(directory: str | Path, *, name: str | None = None) -> Path | None:
    """Write ``directory/README.md`` atomically. A failure is logged, never raised: a card that
    cannot be written must not cost a trained model."""
    from .atomic_files import atomic_write_text

    directory = Path(directory)
    try:
        atomic_write_text(directory / CARD_FILE, render_model_card(directory, name=name))
    except Exception as error:  # noqa: BLE001 - the model is saved either way
        logger.warning("%s: model card not written (%s: %s)", directory, type(error).__name__, error)
        return None
    return directory / CARD_FILE


# -- sections ---------------------------------------------------------------------------------

def _summary(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    arch = meta.get("architecture") or {}
    classes = arch.get("prototype_classes") or []
    k = arch.get("num_classes", "?")
    words, _ = _dataset(config)
    return [
        f"A ProtoPNet ([\"This Looks Like That\", Chen et al., NeurIPS 2019]({PAPER})) trained with "
        f"protopnet on {words}: it classifies an image into one of {k} classes by finding "
        f"parts of it that look like {len(classes)} prototypical parts, each a real patch of a training image "
        "(shown below), and adds up similarity × weight into each class's score. The explanation is the computation.\n"
    ]


def _ensemble_summary(directory: Path, meta: dict[str, Any]) -> list[str]:
    members = meta.get("members") or []
    return [
        f"An ensemble of {len(members)} ProtoPNets ([\"This Looks Like That\", Chen et al., NeurIPS 2019]({PAPER})): "
        f"the class scores are the sum of the members' scores over {meta.get('num_classes', '?')} classes, so every "
        "point of a score still comes from one prototype of one member. Each member is a model directory of its own "
        "under `members/`, with its own card.\n"
    ]


def _usage(directory: Path, repo_id: str | None) -> list[str]:
    where = f"hf://{repo_id}" if repo_id else "PATH/TO/THIS/DIRECTORY"
    install = "pip install 'protopnet[hub]'" if repo_id else "pip install protopnet"
    return [
        "## Use it\n",
        f"```sh\n{install}\nprotopnet explain {where} my-image.jpg --out explanations/   # score sheets, HTML and JSON\n```\n",
        "```python\nimport protopnet\n\n"
        f"model = protopnet.load_model(\"{where}\")   # safetensors + JSON, checksums verified; never unpickles\n"
        "e = protopnet.explain(model, \"my-image.jpg\")\ne.save_html(\"explanation.html\")\n```\n",
    ]


def _architecture(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    arch = meta.get("architecture") or {}
    image = meta.get("image") if isinstance(meta.get("image"), dict) else {}
    classes = arch.get("prototype_classes") or []
    k = arch.get("num_classes") or 1
    _, weights = _base_model(arch, config)
    size = arch.get("prototype_size") or ["?", "?"]
    per_class = f"{len(classes) / k:g} per class on average" if k else ""
    rows = [
        ("backbone", weights),
        ("prototypes", f"{len(classes)} ({per_class})"),
        ("prototype shape", f"{arch.get('prototype_dim', '?')} channels × {size[0]} × {size[1]} latent cells"),
        ("add-on layers", f"`{arch.get('add_on', '?')}`"),
        ("similarity", f"`{arch.get('activation', '?')}` (epsilon {_number(arch.get('epsilon'))})"),
        ("input", f"{image.get('size', '?')} × {image.get('size', '?')} RGB, normalised with mean {image.get('mean')} and std {image.get('std')}"),
    ]
    return ["## Model\n", "| | |\n|---|---|\n" + "".join(f"| {a} | {_cell(b)} |\n" for a, b in rows)]


def _members(directory: Path, meta: dict[str, Any]) -> list[str]:
    rows = []
    for i, entry in enumerate(meta.get("members") or []):
        if not isinstance(entry, dict):
            continue
        path = str(entry.get("path", ""))
        rows.append(f"| {i} | [`{_cell(path)}`]({path}/README.md) | `{_cell(entry.get('backbone'))}` | {_cell(entry.get('num_prototypes'))} | {_cell(entry.get('image_size'))} |\n")
    return ["## Members\n", "| member | directory | backbone | prototypes | input size |\n|---|---|---|---|---|\n" + "".join(rows)]


def _class_names(directory: Path, meta: dict[str, Any]) -> tuple[list[str], list[int]]:
    if meta.get("kind") == "ensemble":
        return list(meta.get("class_names") or []), []
    arch = meta.get("architecture") or {}
    names = list(arch.get("class_names") or [f"class_{k}" for k in range(int(arch.get("num_classes") or 0))])
    return names, list(arch.get("prototype_classes") or [])


def _classes(directory: Path, meta: dict[str, Any]) -> list[str]:
    names, owners = _class_names(directory, meta)
    if not names:
        return []
    counts = [0] * len(names)
    for k in owners:
        if isinstance(k, int) and 0 <= k < len(names):
            counts[k] += 1
    shown = names[:CLASSES_LISTED]
    lines = [f"## Classes\n", f"{len(names)} classes, in the order of the model's outputs" + (" (with the number of prototypes of each):\n" if owners else ":\n")]
    table = "| index | class | prototypes |\n|---|---|---|\n" if owners else "| index | class |\n|---|---|\n"
    for k, name in enumerate(shown):
        table += f"| {k} | {_cell(name)} | {counts[k]} |\n" if owners else f"| {k} | {_cell(name)} |\n"
    lines.append(table)
    if len(names) > len(shown):
        lines.append(f"… and {len(names) - len(shown)} more; all of them are in `model.json`.\n")
    return lines


def _data_and_protocol(config: dict[str, Any]) -> list[str]:
    if not config:
        return ["## Data and protocol\n", "Not recorded: this directory holds no `config.yaml` (the model was not trained by `protopnet train`, "
                "or its run config was not kept).\n"]
    data, schedule, run = _section(config, "data"), _section(config, "schedule"), _section(config, "run")
    optim, loss, model = _section(config, "optim"), _section(config, "loss"), _section(config, "model")
    words, _ = _dataset(config)
    kind = dataset_kind(data.get("root"))
    if kind in ("cub200", "cars"):
        pictures = "cropped to their bounding boxes" if data.get("crop", "bbox") == "bbox" else "full pictures (not cropped)"
    else:
        pictures = "whole pictures"
    if data.get("offline_augmentation"):
        augmentation = "the paper's offline augmentation (fixed augmented copies in `train_augmented/`)"
    elif data.get("augment_views"):
        augmentation = f"{data['augment_views']} fixed views of each training picture (the picture and seeded augmentations)"
    elif data.get("augment", True):
        augmentation = "on-the-fly augmentation"
    else:
        augmentation = "none"
    val = data.get("val_fraction", 0)
    rows = [
        ("data", words),
        ("pictures", f"{pictures}, resized to {data.get('image_size', '?')} px"),
        ("training augmentation", augmentation),
        ("validation", f"{_fraction(val)} of the training pictures, stratified by class, seed {run.get('seed', 0)}: used to select the model"
                       if val else "none (the final model is kept)"),
        ("test", "the dataset's test split, only ever reported, never used to choose"),
        ("schedule", (f"{schedule['pretrain_epochs']} epochs of backbone pre-training, then " if schedule.get("pretrain_epochs") else "")
                     + f"{schedule.get('epochs', '?')} epochs, the first {schedule.get('warm_epochs', '?')} warm-up; push at epoch "
                     f"{schedule.get('push_start', '?')} and every {schedule.get('push_every', '?')} after, each followed by "
                     f"{schedule.get('last_layer_iterations', '?')} last-layer iterations"),
        ("pruning", f"the paper's pruning after the final push (k = {schedule.get('prune_k')}, threshold {schedule.get('prune_threshold')})"
                    if schedule.get("prune") else "none in training"),
        ("learning rates (Adam)", ", ".join(f"{key.removesuffix('_lr').replace('_', ' ')} {_number(value)}" for key, value in optim.items()
                                            if key.endswith("_lr") and (key != "pretrain_lr" or schedule.get("pretrain_epochs")))),
        ("loss", ", ".join(f"{key} {_number(value)}" for key, value in loss.items())),
        ("arithmetic", (("auto (bf16 where the hardware computes it natively, else fp32)" if run.get("precision") == "auto"
                         else str(run.get("precision", "fp32"))) + f" on {run.get('device', 'auto')}")),
        ("prototypes start as", "latent patches of training pictures of their class" if model.get("prototype_init") == "patches"
                                else "uniform noise in [0, 1)"),
    ]
    return ["## Data and protocol\n",
            "| | |\n|---|---|\n" + "".join(f"| {a} | {_cell(b)} |\n" for a, b in rows),
            "The whole run config is [`config.yaml`](config.yaml): `protopnet train config.yaml` trains the same model again "
            "(with the data at `data.root`).\n"]


def _results(meta: dict[str, Any]) -> list[str]:
    current, earlier = _evaluations(meta)
    lines = ["## Results\n"]
    accuracy = [(key, figures) for key, figures in current.items() if key != "interpretability" and "accuracy" in figures]
    if accuracy:
        table = "| split | data | images | top-1 accuracy | top-5 accuracy | measured |\n|---|---|---|---|---|---|\n"
        for key, figures in accuracy:
            data = PurePosixPath(str(figures.get("data") or "").replace("\\", "/")).name
            table += (f"| {_cell(figures.get('split', key))} | {_cell(data)} | {_cell(figures.get('n', '—'))} | "
                      f"{_fraction(figures.get('accuracy'))} | {_fraction(figures.get('top5'))} | {_cell(figures.get('when', ''))} |\n")
        lines.append(table)
    else:
        lines.append("No accuracy has been recorded for these weights (`protopnet train` records the test accuracy of the "
                     "model it selects; `protopnet evaluate MODEL --data DATA --record` records one).\n")
    figures = current.get("interpretability")
    if isinstance(figures, dict):
        rows = [(k, v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        lines.append("**Interpretability** (see `protopnet.interpretability`):\n")
        lines.append("| figure | value |\n|---|---|\n" + "".join(f"| {_cell(k)} | {_number(v)} |\n" for k, v in rows))
        skipped = figures.get("skipped")
        if isinstance(skipped, dict) and skipped:
            lines.append("Not measured: " + "; ".join(f"{_cell(k)} ({_cell(v)})" for k, v in skipped.items()) + ".\n")
    else:
        lines.append("No interpretability figures were measured for these weights.\n")
    if earlier:
        shown = ", ".join(f"{key} {_fraction(f.get('accuracy'))}" if "accuracy" in f else key for key, f in earlier.items())
        lines.append(f"Recorded for an earlier version of this model (before the edits or pruning listed under History), "
                     f"so not figures of these weights: {shown}.\n")
    return lines


def _prototypes(directory: Path, meta: dict[str, Any]) -> list[str]:
    provenance = meta.get("provenance")
    if not isinstance(provenance, list) or not provenance:
        return ["## Prototypes\n", "The prototypes were never pushed onto training patches, so they have no source pictures.\n"]
    # the first prototype of each class, for as many classes as are shown
    picked, seen = [], set()
    for entry in provenance:
        if isinstance(entry, dict) and entry.get("class_index") not in seen:
            seen.add(entry.get("class_index"))
            picked.append(entry)
        if len(picked) == PROTOTYPES_SHOWN:
            break
    table = "| prototype | class | patch | source picture (box: the patch) | source | distance at push |\n|---|---|---|---|---|---|\n"
    for entry in picked:
        images = entry.get("images") if isinstance(entry.get("images"), dict) else {}

        def picture(kind: str) -> str:
            relative = images.get(kind)
            if isinstance(relative, str) and (directory / relative).is_file():
                return f"![prototype {entry.get('prototype')} {kind}]({relative})"
            return "—"

        source = PurePosixPath(str(entry.get("path", "")).replace("\\", "/"))
        where = "/".join(source.parts[-2:]) if len(source.parts) >= 2 else str(source)
        table += (f"| {_cell(entry.get('prototype'))} | {_cell(entry.get('class_name', entry.get('class_index')))} | {picture('patch')} | "
                  f"{picture('source')} | `{_cell(where)}` | {_number(entry.get('distance'))} |\n")
    return ["## Prototypes\n",
            f"{len(picked)} of the {len(provenance)} prototypes (the first of each class), each the training patch it was "
            "pushed onto. All of them are in `prototypes/` (patch, source picture with box, activation overlay), with "
            "their provenance in `model.json`.\n", table]


def _history(meta: dict[str, Any]) -> list[str]:
    history = meta.get("history")
    if not isinstance(history, list) or not history:
        return ["## History\n", "No pushes, pruning or edits are recorded.\n"]
    rows = []
    for event in history:
        if not isinstance(event, dict):
            continue
        what = event.get("event", "?")
        when = event.get("when") or event.get("time") or ""
        if what == "push":
            detail = f"epoch {event['epoch'] + 1}" if isinstance(event.get("epoch"), int) else f"onto {event.get('data', '?')}"
        elif what in ("prune", "edit"):
            detail = f"{event.get('prototypes_before', '?')} → {event.get('prototypes_after', '?')} prototypes"
            body = event.get("what") if isinstance(event.get("what"), dict) else {}
            if what == "prune":
                detail += f" (k = {body.get('k')}, threshold {body.get('threshold')})"
            else:
                changes = [f"{len(body[key])} {key}" for key in ("removed", "relabelled", "replaced") if body.get(key)]
                detail += f" ({', '.join(changes)})" if changes else ""
            before, after = event.get("accuracy_before") or {}, event.get("accuracy_after") or {}
            if isinstance(before, dict) and isinstance(after, dict) and before.get("test") is not None:
                detail += f"; test accuracy {_fraction(before.get('test'))} → {_fraction(after.get('test'))}"
        elif what == "ensemble":
            body = event.get("what") if isinstance(event.get("what"), dict) else {}
            detail = f"{len(body.get('members') or [])} members"
        else:
            detail = ""
        rows.append(f"| {_cell(what)} | {_cell(when)} | {_cell(detail)} |\n")
    return ["## History\n", "| event | when | what |\n|---|---|---|\n" + "".join(rows)]


def _intended_use(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    words = _dataset(config)[0] if config else "its training data"
    return [
        "## Intended use and limits\n",
        f"- For research on interpretable image classification, and for classifying pictures like those of {words} into "
        "the classes above. It always answers one of these classes: a picture of anything else gets one of them too.\n"
        "- The accuracy above holds for the test split it was measured on; pictures from another source (camera, "
        "framing, cropping — see the protocol) may score lower.\n"
        "- A prototype's similarity is measured in the network's latent space: two patches that are close there need "
        "not look alike to a person, and a prototype can sit on background. Read the explanations with that in mind; "
        "`protopnet analyze` shows each prototype's nearest training and test patches.\n"
        "- The pictures in `prototypes/` are crops of training images: whoever publishes the model publishes them, "
        "so check that the training images' terms allow it, and set the card's `license` accordingly.\n",
    ]


def _files(directory: Path, meta: dict[str, Any]) -> list[str]:
    rows = [("model.safetensors", f"every tensor (SHA-256 `{_tensor_digest(meta)}`, checked on load)" if _tensor_digest(meta) else "every tensor"),
            ("model.json", "architecture, classes, prototype provenance, history, recorded evaluations")]
    if meta.get("kind") == "ensemble":
        rows = [("model.json", "the ensemble: its members and how their scores are combined"), ("members/", "one model directory per member")]
    if (directory / "config.yaml").is_file():
        rows.append(("config.yaml", "the run config that trained it"))
    if (directory / "prototypes").is_dir():
        rows.append(("prototypes/", "each prototype's patch, source picture with box and activation overlay (PNG)"))
    if (directory / "pruning.json").is_file():
        rows.append(("pruning.json", "the pruning report: every prototype's nearest patches and why it was kept or removed"))
    return ["## Files\n", "| file | what |\n|---|---|\n" + "".join(f"| `{a}` | {_cell(b)} |\n" for a, b in rows),
            "Nothing here is a pickle: loading runs no code from the files.\n"]
