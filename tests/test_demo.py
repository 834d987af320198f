"""The demo config, trained whole: its figures, and the same training under ``torchrun``.

One module-scoped pair of runs serves every test here: ``configs/demo.yaml`` trained in this
process (one thread) and, at the same time, as two torchrun ranks (one thread each). CI runs this
file twice, with the CPU's own kernels and with ``ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``: the figures must hold on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protopnet.checkpoint import load_model
from protopnet.config import load_config
from protopnet.data import build_dataset
from protopnet.demo import demo_config_path
from protopnet.interpretability import prototype_localization

from conftest import load_benchmark, train_both

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # trains the demo twice, once under torchrun


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """``(config dict, single-process run dir, two-rank run dir, files rank 1 wrote)``."""
    tmp_path = tmp_path_factory.mktemp("demo")
    config = load_config(demo_config_path()).to_dict()
    config["run"].update(device="cpu", threads=1)
    single, ddp, writes = train_both(tmp_path, json.dumps(config))
    return config, single, ddp, writes


def _push_images(config: dict, model) -> object:
    d = config["data"]
    return build_dataset("synthetic", "train", image_size=d["image_size"], num_classes=d["synthetic_classes"],
                         images_per_class=d["synthetic_train_per_class"], seed=d["synthetic_seed"], mean=model.mean, std=model.std)


def test_the_demo_reaches_its_figures(demo_runs):
    """The README's demo figures, as floors that hold over seeds 0-2 with both kernel settings
    (``python benchmarks/bench_demo.py``; the spread is in the README). A model whose prototypes
    sat on background or on the distractors every class shares would fail the localisation floor:
    a random box scores 0.03."""
    config, single, _, _ = demo_runs
    results = json.loads((single / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.95
    model = load_model(single / "model")
    data = _push_images(config, model)
    after = prototype_localization(model, data)
    before = prototype_localization(model, data, before_pruning=True)
    assert after["chance"] < 0.05
    assert after["localization"] >= DEMO_FLOORS["after"], after
    assert before["localization"] >= DEMO_FLOORS["before"], before


def test_demo_where_sorts_every_prototype_and_agrees_with_the_localisation_figure(demo_runs):
    """benchmarks/demo_where.py: every prototype (kept and pruned) lands in exactly one place, and
    the kept ones on their glyph are the share ``prototype_localization`` reports."""
    config, single, _, _ = demo_runs
    counts, cells_on, total = load_benchmark("demo_where").where(single)
    model = load_model(single / "model")
    assert total == config["data"]["synthetic_classes"] * config["model"]["prototypes_per_class"]
    assert sum(counts.values()) == total and 0 <= cells_on <= total
    kept = sum(n for (fate, _), n in counts.items() if fate == "kept")
    assert kept == model.prototypes.shape[0]
    after = prototype_localization(model, _push_images(config, model))["localization"]
    assert counts[("kept", "glyph")] / kept == pytest.approx(after)


def test_torchrun_trains_the_demo_with_pruning_and_every_rank_keeps_the_same_prototypes(demo_runs):
    """``torchrun --nproc_per_node=2 -m protopnet train configs/demo.yaml``: pretraining, warm-up,
    joint epochs, two pushes, the restart after the first, and pruning. Every decision that changes
    the prototypes is made once on rank 0's model and shared (the Trainer checks after every push,
    prune and last-layer step that all ranks hold bit-identical models, and fails the run
    otherwise), so the run ends, where ranks that pruned on their own numbers once crashed on a
    shape mismatch.

    Against one process: the demo's ``tiny_cnn`` has BatchNorm, and two ranks normalise over their
    half of each batch, so the two-rank run is another run of the same recipe (as for any DDP
    training with BatchNorm), not the same run up to rounding; and flat-coloured glyphs make max
    pooling's choices near-ties that rounding decides. So the comparison is of the outcome, with
    tolerances set by how much the demo moves between seeds and CPU kernels
    (``benchmarks/bench_demo.py``: test accuracy 0.98-1.0, prototypes kept after pruning 45-50 of 50).
    What must hold exactly is checked exactly: each kept prototype *is* a latent patch of the
    training picture its provenance names, of its own class, and the pruning record accounts for
    every prototype."""
    config, single, ddp, writes = demo_runs
    assert writes == [], f"rank 1 wrote into the run directory: {writes[:5]}"

    results = {name: json.loads((run / "results.json").read_text()) for name, run in (("single", single), ("ddp", ddp))}
    for name, result in results.items():
        assert result["test"]["accuracy"] >= 0.95, (name, result["test"])
    assert abs(results["single"]["test"]["accuracy"] - results["ddp"]["test"]["accuracy"]) <= 0.05

    total = config["model"]["prototypes_per_class"] * config["data"]["synthetic_classes"]
    kept = {}
    for name, run in (("single", single), ("ddp", ddp)):
        model = load_model(run / "model").eval()
        record = json.loads((run / "model" / "model.json").read_text())
        (event,) = [h for h in record["history"] if h.get("event") == "prune"]
        assert event["prototypes_before"] == total and event["prototypes_after"] == model.num_prototypes
        assert sorted(event["what"]["kept"] + event["what"]["removed"]) == list(range(total))
        assert len(event["removed_provenance"]) == len(event["what"]["removed"])
        kept[name] = model.num_prototypes
        data = _push_images(config, model)
        with torch.no_grad():
            for j, source in enumerate(record["provenance"]):
                image, label = data[source["dataset_index"]]
                assert label == int(model.prototype_classes[j])
                r, c = source["position"]
                patch = model.latent(image.unsqueeze(0))[0, :, r, c]
                assert float(((patch - model.prototypes[j, :, 0, 0]) ** 2).sum()) < 1e-6, (name, j)
    # pruning kept 45 to 50 of the 50 over seeds and kernels (31-49 with the earlier config): two ranks
    # must land in a range as wide
    for name, count in kept.items():
        assert 0.5 * total <= count <= total, (name, kept)


# Floors for the localisation figures (see test_the_demo_reaches_its_figures): bench_demo.py measured
# at least 0.854 after pruning and 0.800 before over seeds 0-2 with the default and the AVX2 kernels,
# at 1 and at 2 threads (twelve runs, docs/demo-experiments.md); a CPU with yet other kernels
# (AVX-512 without AMX) moves them too, so the floors sit a few prototypes lower. Chance is 0.03.
DEMO_FLOORS = {"after": 0.80, "before": 0.75}
