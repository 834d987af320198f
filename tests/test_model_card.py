"""The model card (README.md) every model directory carries: front matter the Hub reads, figures
that match what the directory and the run recorded, and nothing that loading depends on."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from protopnet import load_model, save_model
from protopnet.config import Config
from protopnet.edit import edit_model, save_edited_model
from protopnet.ensemble import Ensemble, save_ensemble
from protopnet.model_card import front_matter, record_evaluation
from protopnet.train import Trainer
from protopnet.train.push import push_prototypes

from conftest import ColourDataset, tiny_config, tiny_data, tiny_model


def split_card(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("card")
    config = tiny_config(tmp_path, prune=True, prune_k=4, prune_threshold=3)
    result = Trainer(config, data=tiny_data()).fit()
    return tmp_path / "run", result


def test_a_trained_model_carries_a_card_with_the_accuracy_of_its_run(pruned_run):
    run, result = pruned_run
    results = json.loads((run / "results.json").read_text())
    meta, body = split_card(run / "model" / "README.md")
    assert meta["library_name"] == "protopnet"
    assert "protopnet" in meta["tags"] and meta["datasets"] == ["protopnet-synthetic"] and meta["metrics"] == ["accuracy"]
    assert "license" not in meta  # the publisher's choice
    assert "base_model" not in meta  # tiny_cnn trained from scratch
    entry = meta["model-index"][0]
    assert entry["name"] == "run"  # RUN/model goes by the run's name
    figures = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert figures == {"accuracy": results["test"]["accuracy"], "top_5_accuracy": results["test"]["top5"]}
    assert entry["results"][0]["dataset"]["split"] == "test"
    # the body: classes, protocol, accuracy, prototypes with their pictures, the pruning
    model = load_model(run / "model")
    for name in model.class_names:
        assert f"| {name} |" in body
    assert f"{100 * results['test']['accuracy']:.1f} %" in body and f"{100 * results['validation']['accuracy']:.1f} %" in body
    assert "resized to 32 px" in body and "stratified by class, seed 3" in body
    links = [part.split(")")[0] for part in body.split("](prototypes/")[1:]]
    assert links and all((run / "model" / "prototypes" / link).is_file() for link in links)
    prune = next(h for h in model.history if h["event"] == "prune")
    assert f"| prune | {prune['when']} | 6 → {model.num_prototypes} prototypes (k = 4, threshold 3)" in body
    assert "## Intended use and limits" in body
    # recorded with the checksum of the tensors they measured
    evaluation = json.loads((run / "model" / "model.json").read_text())["extra"]["evaluation"]
    digest = json.loads((run / "model" / "model.json").read_text())["tensors"]["sha256"]
    assert evaluation["test"]["tensors_sha256"] == digest and evaluation["test"]["n"] == results["test"]["n"]


def test_the_hub_library_reads_the_cards_evaluation(pruned_run):
    hub = pytest.importorskip("huggingface_hub")
    run, _ = pruned_run
    results = json.loads((run / "results.json").read_text())
    card = hub.ModelCard.load(run / "model" / "README.md")
    assert card.data.library_name == "protopnet"
    top1 = next(r for r in card.data.eval_results if r.metric_type == "accuracy")
    assert top1.metric_value == results["test"]["accuracy"] and top1.dataset_split == "test"


def test_an_edited_model_does_not_claim_its_sources_accuracy(pruned_run, tmp_path):
    run, _ = pruned_run
    model = load_model(run / "model")
    data = tiny_data()
    edit_model(model, data.clean, remove=[0], train_indices=data.train_indices, iterations=2)
    save_edited_model(model, tmp_path / "edited")
    meta, body = split_card(tmp_path / "edited" / "README.md")
    assert "model-index" not in meta
    assert "No accuracy has been recorded for these weights" in body
    assert "Recorded for an earlier version of this model" in body
    assert "| edit |" in body and "| prune |" in body
    # once measured, the edited model's own figure is the one shown
    record_evaluation(tmp_path / "edited", {"test": {"split": "test", "data": "synthetic", "n": 12, "accuracy": 0.25, "top5": 1.0}})
    meta, _ = split_card(tmp_path / "edited" / "README.md")
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.25


def test_base_model_names_the_backbones_weights_on_the_hub(tmp_path):
    save_model(tiny_model(), tmp_path / "m", run_config=Config().to_dict())
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    for backbone, pretrained, expected in [("resnet34", True, "timm/resnet34.tv_in1k"), ("densenet161", True, "timm/densenet161.tv_in1k"),
                                           ("vgg19", True, "timm/vgg19.tv_in1k"), ("resnet34", False, None),
                                           ("mobilenet_v2", True, None),  # torchvision's weights have no copy on the Hub
                                           ("timm/convnext_tiny.fb_in1k", True, "timm/convnext_tiny.fb_in1k")]:
        meta["architecture"]["backbone"] = backbone
        meta_path.write_text(json.dumps(meta))
        config = Config().to_dict()
        config["model"]["pretrained"] = pretrained
        (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(config))
        assert front_matter(tmp_path / "m").get("base_model") == expected, backbone
    from protopnet.model_card import render_model_card

    meta["architecture"]["backbone"] = "mobilenet_v2"
    meta_path.write_text(json.dumps(meta))
    assert "`mobilenet_v2` with torchvision's ImageNet weights (`IMAGENET1K_V1`)" in render_model_card(tmp_path / "m")


def test_loading_never_needs_the_card(tmp_path, caplog, monkeypatch):
    data = ColourDataset()
    model = tiny_model().eval()
    push_prototypes(model, data)
    save_model(model, tmp_path / "m", dataset=data)
    assert (tmp_path / "m" / "README.md").is_file()
    (tmp_path / "m" / "README.md").unlink()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(x).logits, model(x).logits)
    # a card that cannot be written costs the card, not the model
    import protopnet.model_card as model_card

    monkeypatch.setattr(model_card, "render_model_card", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="protopnet.model_card"):
        save_model(model, tmp_path / "n", dataset=data)
    assert not (tmp_path / "n" / "README.md").exists() and "model card not written (ZeroDivisionError" in caplog.text
    load_model(tmp_path / "n")


def test_an_ensemble_has_a_card_and_so_does_each_member(tmp_path):
    a, b = tiny_model(seed=0, class_names=["x", "y", "z"]), tiny_model(seed=1, class_names=["x", "y", "z"])
    save_ensemble(Ensemble([a, b]).eval(), tmp_path / "ens")
    meta, body = split_card(tmp_path / "ens" / "README.md")
    assert meta["library_name"] == "protopnet" and "ensemble" in meta["tags"]
    assert "## Members" in body and "(members/1/README.md)" in body and "| 2 | z |" in body
    assert (tmp_path / "ens" / "members" / "0" / "README.md").is_file()
    load_model(tmp_path / "ens")


def test_cli_push_keeps_the_run_config_and_evaluate_record_puts_its_figures_in_the_card(tmp_path, capsys):
    from protopnet.cli import main

    config = Config().to_dict()
    config["model"].update(backbone="tiny_cnn", pretrained=False)
    config["data"].update(image_size=32, val_fraction=0.2)
    save_model(tiny_model(), tmp_path / "m", run_config=config)
    assert main(["-q", "push", str(tmp_path / "m"), "--data", "synthetic", "--out", str(tmp_path / "pushed")]) == 0
    _, body = split_card(tmp_path / "pushed" / "README.md")
    assert "20.0 % of the training pictures, stratified by class" in body and "| push |" in body
    capsys.readouterr()
    assert main(["-q", "evaluate", str(tmp_path / "pushed"), "--data", "synthetic", "--json", str(tmp_path / "eval.json"), "--record"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    meta, body = split_card(tmp_path / "pushed" / "README.md")
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == report["accuracy"]
    assert f"| test | synthetic | {report['n']} | {100 * report['accuracy']:.1f} % |" in body
