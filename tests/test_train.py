"""The whole schedule on a tiny problem: stages, selection, outputs, determinism, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from protopnet import load_model
from protopnet.config import Config
from protopnet.train import RunData, Trainer, plan_schedule
from protopnet.train.loop import Trainer as TrainerClass

from conftest import ColourDataset


def tiny_config(tmp_path, **schedule):
    config = Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"image_size": 32, "batch_size": 6, "test_batch_size": 8, "push_batch_size": 5, "augment": False},
            "schedule": {"epochs": 4, "warm_epochs": 1, "push_start": 1, "push_every": 2, "last_layer_iterations": 3, **schedule},
            "optim": {"warm_add_on_lr": 1e-2, "warm_prototypes_lr": 1e-2, "add_on_lr": 1e-2, "prototypes_lr": 1e-2, "backbone_lr": 1e-3, "last_layer_lr": 1e-2},
            "run": {"seed": 3, "device": "cpu"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    return config


def tiny_data():
    train = ColourDataset(num_classes=3, per_class=8, seed=0)
    test = ColourDataset(num_classes=3, per_class=4, seed=1)
    val = [0, 8, 16]
    return RunData(train, train, test, [i for i in range(len(train)) if i not in val], val)


def test_plan_follows_the_reference_schedule():
    config = Config()
    plan = plan_schedule(config.schedule)
    stages = [(s.stage, s.epoch) for s in plan]
    assert stages[:5] == [("warm", e) for e in range(5)]
    assert ("push", 10) in stages and ("push", 20) in stages and ("push", 29) in stages
    assert stages[stages.index(("push", 10)) + 1] == ("last_layer", 10)
    assert ("push", 9) not in stages and ("push", 15) not in stages


def test_stages_train_only_their_parameters(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=2, push_start=5, push_at_end=False), data=tiny_data())
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer._train_epoch(trainer.plan[0])  # warm
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "prototypes" in changed and any(k.startswith("add_on") for k in changed)
    assert "last_layer.weight" not in changed
    assert not any(k.startswith("features") and "running" not in k and "num_batches" not in k for k in changed), changed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer._train_epoch(trainer.plan[1])  # joint
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert any(k.startswith("features") and k.endswith("weight") for k in changed)
    assert "last_layer.weight" not in changed


def test_a_run_writes_its_outputs_and_selects_a_pushed_model(tmp_path):
    config = tiny_config(tmp_path)
    result = Trainer(config, data=tiny_data()).fit()
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [(s.stage, s.epoch) for s in plan_schedule(config.schedule)]
    joint = next(r for r in lines if r["stage"] == "joint")
    assert {"ce", "cluster", "separation", "avg_separation", "l1", "loss", "train_accuracy", "val_accuracy", "seconds"} <= set(joint)
    assert Config.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text())) == config
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n"] == 12 and 0 <= results["test"]["accuracy"] <= 1
    model = load_model(result.model_dir)
    assert model.provenance is not None and len(model.provenance) == 6
    # the selected model is a pushed one: every prototype is a real training patch
    data = tiny_data()
    for entry in model.provenance:
        assert entry["dataset_index"] in data.train_indices
        image = data.clean.to_tensor(data.clean.load_image(entry["dataset_index"]))[None]
        with torch.no_grad():
            assert model(image).min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=1e-4)


def test_same_seed_same_weights(tmp_path):
    a = Trainer(tiny_config(tmp_path / "a", epochs=3, push_start=2), data=tiny_data()).fit()
    b = Trainer(tiny_config(tmp_path / "b", epochs=3, push_start=2), data=tiny_data()).fit()
    wa = load_file(a.model_dir / "model.safetensors")
    wb = load_file(b.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_resume_ends_with_the_same_weights(tmp_path, monkeypatch, stop_after):
    full = Trainer(tiny_config(tmp_path / "full"), data=tiny_data()).fit()

    original = TrainerClass._after_step

    def crash(self, step, val):
        original(self, step, val)
        if step.index == stop_after:
            raise Interrupted

    monkeypatch.setattr(TrainerClass, "_after_step", crash)
    with pytest.raises(Interrupted):
        Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit()
    monkeypatch.setattr(TrainerClass, "_after_step", original)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit()
    resumed = Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit(resume=True)
    wa = load_file(full.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["stage"] for r in full.metrics] == [r["stage"] for r in resumed.metrics]


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch):
    full = Trainer(tiny_config(tmp_path / "full"), data=tiny_data()).fit()
    original = TrainerClass._after_step

    def crash(self, step, val):
        original(self, step, val)
        if step.index == 3:
            raise Interrupted

    monkeypatch.setattr(TrainerClass, "_after_step", crash)
    with pytest.raises(Interrupted):
        Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit()
    monkeypatch.setattr(TrainerClass, "_after_step", original)
    newest = sorted((tmp_path / "cut" / "run" / "checkpoints").iterdir())[-1]
    blob = newest / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[: len(blob.read_bytes()) // 2])
    resumed = Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit(resume=True)
    wa = load_file(full.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_different_config(tmp_path):
    Trainer(tiny_config(tmp_path, epochs=2, push_start=1), data=tiny_data()).fit()
    with pytest.raises(ValueError, match="different"):
        Trainer(tiny_config(tmp_path, epochs=3, push_start=1), data=tiny_data()).fit(resume=True)
