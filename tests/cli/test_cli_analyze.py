"""`protopnet analyze --interpretability` puts the interpretability metrics in the report."""

from __future__ import annotations

import json


import protopnet
from protopnet.cli import main
from protopnet.data import SyntheticParts

from conftest import tiny_model


def test_analyze_adds_interpretability_to_the_report(tmp_path):
    model = tiny_model(num_classes=2, prototypes_per_class=2)
    data = SyntheticParts(split="train", num_classes=2, image_size=32, mean=model.mean, std=model.std)
    model.class_names = list(data.classes)
    protopnet.push(model, data)
    protopnet.save_model(model, tmp_path / "model", dataset=data)
    out = tmp_path / "analysis"
    assert main(["-q", "analyze", str(tmp_path / "model"), "--data", "synthetic", "--out", str(out), "--k", "3", "--limit", "20", "--interpretability"]) == 0
    results = json.loads((out / "interpretability.json").read_text())
    assert 0.0 <= results["prototype_localization"] <= 1.0 and results["n_prototypes"] == 4
    html = (out / "index.html").read_text()
    assert "onsistency" in html and "eletion" in html


def test_analyze_measures_only_the_metrics_listed(tmp_path):
    model = tiny_model(num_classes=2, prototypes_per_class=2)
    data = SyntheticParts(split="train", num_classes=2, image_size=32, mean=model.mean, std=model.std)
    model.class_names = list(data.classes)
    protopnet.save_model(model, tmp_path / "model", dataset=data)
    out = tmp_path / "analysis"
    argv = ["-q", "analyze", str(tmp_path / "model"), "--data", "synthetic", "--out", str(out), "--k", "2", "--limit", "8", "--splits", "test"]
    assert main(argv + ["--interpretability", "consistency"]) == 0
    results = json.loads((out / "interpretability.json").read_text())
    assert 0.0 <= results["consistency"] <= 1.0 and 0.0 <= results["consistency_fixed_cell"] <= 1.0
    assert results["stability"] is None and results["purity"] is None and results["deletion_gap"] is None
    assert set(results["details"]) == {"consistency", "consistency_baselines"}
