"""The demo: the whole ProtoPNet job on the built-in synthetic dataset, on any laptop, offline.

Trains the model of ``configs/demo.yaml`` (warm-up, joint, push, last layer), evaluates it on the
test split, measures how often prototypes land on the class-defining parts, explains a few test
images, and writes ``demo.json`` and an HTML report (``index.html``).
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .atomic_files import atomic_write_json
from .checkpoint import load_model
from .config import Config, load_config
from .explain.html import percent

if TYPE_CHECKING:
    from .model import ProtoPNet
    from .runtime import ProgressBars

logger = logging.getLogger(__name__)


def demo_config_path() -> Path:
    """The packaged demo config (the same file as the repository's ``configs/demo.yaml``)."""
    return Path(str(resources.files("protopnet") / "configs" / "demo.yaml"))


def demo_config(overrides: Sequence[str] = ()) -> Config:
    return load_config(demo_config_path(), overrides)


def run_demo(
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    explain_images: int = 4,
    progress_bars: ProgressBars | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the figures also written to ``out_dir/demo.json``.

    The figures: ``test_accuracy``, ``top5``, ``localization`` (fraction of prototypes whose
    pushed box centre lies in the class-part box of its source image), ``localization_chance``
    (what randomly placed boxes would score), ``localization_before_pruning`` and
    ``prototypes_before_pruning`` (the same over every prototype training made, the ones pruning
    removed included; equal to the final figures when the config does not prune), ``seconds``
    (wall time of the whole demo),
    ``train_seconds``, ``prototypes``, ``classes``, and where the model and report are.
    ``progress_bars`` draws a bar per training stage (:data:`protopnet.runtime.ProgressBars`).
    """
    from .interpretability import prototype_localization
    from .train import Trainer

    start = time.perf_counter()
    out_dir = Path(out_dir)
    config = demo_config(overrides)
    config.output.dir = str(out_dir)
    trainer = Trainer(config, out_dir, progress_bars=progress_bars)
    result = trainer.fit(resume=resume)
    model = load_model(result.model_dir)
    localization = prototype_localization(model, trainer.data.clean)
    figures: dict[str, Any] = {
        "test_accuracy": result.test["accuracy"] if result.test else None,
        "top5": result.test["top5"] if result.test else None,
        "validation_accuracy": result.validation.get("accuracy"),
        "localization": localization["localization"],
        "localization_chance": localization["chance"],
        "localization_before_pruning": prototype_localization(model, trainer.data.clean, before_pruning=True)["localization"],
        "prototypes_before_pruning": config.model.prototypes_per_class * model.num_classes,
        "prototypes": model.num_prototypes,
        "classes": model.num_classes,
        "train_seconds": round(result.seconds, 2),
        "model": str(result.model_dir),
    }
    from .model_card import record_evaluation

    record_evaluation(result.model_dir, {"interpretability": {  # the model card shows them
        "prototype_localization": figures["localization"], "prototype_localization_chance": figures["localization_chance"],
        "prototype_localization_before_pruning": figures["localization_before_pruning"]}})
    report = _write_report(model, trainer, out_dir, explain_images, figures)
    if report is not None:
        figures["report"] = str(report)
    figures["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out_dir / "demo.json", figures)
    return figures


def _write_report(model: ProtoPNet, trainer: Any, out_dir: Path, count: int, figures: dict[str, Any]) -> Path | None:
    """Explain ``count`` test images (of different classes) and write ``index.html``; the
    pictures are also saved as ``samples/<class>.png`` to try ``protopnet explain`` on."""
    test = trainer.data.test
    chosen: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(test.targets):
        if label not in seen:
            chosen.append(i)
            seen.add(label)
        if len(chosen) >= count:
            break
    samples = out_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for i in chosen:
        test.load_image(i).save(samples / f"{test.classes[test.targets[i]]}.png")
    return write_demo_report(model, test, chosen, out_dir, figures)


# -- the demo's page ------------------------------------------------------------------------------

_DEMO_FIGURES: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("test_accuracy", "Test accuracy", percent),
    ("top5", "Top-5 test accuracy", percent),
    ("validation_accuracy", "Validation accuracy", percent),
    ("localization", "Prototypes on the class-defining part", percent),
    ("localization_chance", "… the same for boxes placed at random", percent),
    ("prototypes", "Prototypes", str),
    ("classes", "Classes", str),
    ("train_seconds", "Training time (seconds)", lambda v: f"{float(v):.1f}"),
)


def write_demo_report(
    model: ProtoPNet,
    dataset: Any,
    indices: Sequence[int],
    directory: str | Path,
    figures: dict[str, Any] | None = None,
    picture_rows: int = 5,
) -> Path:
    """The demo's page, ``directory/index.html``: the run's figures, then the explanation (score
    sheets of the two most probable classes) of each test image ``dataset[i]`` for i in
    ``indices``, with its true class. Each explanation's JSON goes to
    ``directory/explanations/NN.json``. Returns the HTML path."""
    from .explain import explain, explanation_html
    from .explain.html import FileImages, Report, Section, render
    from .explain.reports import how_to_read

    directory = Path(directory)
    images = FileImages(directory)
    report = Report("ProtoPNet demo: this looks like that", subtitle="A model trained on the built-in synthetic dataset, explained")
    rows = []
    for key, label, show in _DEMO_FIGURES:
        value = (figures or {}).get(key)
        if value is not None:
            rows.append([label, show(value)])
    if rows:
        report.add(Section("How well it works", rows=rows, header=["", "value"], anchor="figures"))
    names = list(model.class_names)
    for n, index in enumerate(indices, start=1):
        explanation = explain(model, dataset.load_image(int(index)), top_classes=min(2, len(names)), top_prototypes=4)
        explanation.save_json(directory / "explanations" / f"{n:02d}.json")
        target = int(dataset.targets[int(index)])
        fragment = explanation_html(explanation, images, picture_rows, prefix=f"image{n}-")
        report.add(render("demo_image.html", n=n, truth=names[target], verdict="right" if explanation.predicted == target else "wrong", explanation=fragment))
    report.add(how_to_read())
    report.add(render("demo_note.html"))
    return report.write(directory / "index.html")
