"""The whole schedule on a tiny problem: stages, selection, outputs, determinism, resume."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from protopnet import load_model
from protopnet.config import Config
from protopnet.train import RunData, Trainer, plan_schedule
from protopnet.train.loop import Trainer as TrainerClass

from conftest import ColourDataset, moving_average, record_trajectory, tiny_config, tiny_data


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


def test_the_last_layer_stage_reads_push_s_scan_instead_of_the_pictures(tmp_path, monkeypatch):
    """Push keeps its latent maps for the last-layer stage of its round: that stage decodes no
    picture, and the run ends with the weights of a run that scans the pictures again (the maps
    over budget: ``data.feature_cache_max_gb``)."""
    loads: list[int] = []
    stages: dict[str, list[int]] = {}
    original_load, original_last = ColourDataset.load_image, TrainerClass._last_layer
    monkeypatch.setattr(ColourDataset, "load_image", lambda self, i: (loads.append(i), original_load(self, i))[1])

    def counted(self, step):
        loads.clear()
        record = original_last(self, step)
        stages.setdefault(self.out_dir.name, []).append(len(loads))
        return record

    monkeypatch.setattr(TrainerClass, "_last_layer", counted)
    kept_config = tiny_config(tmp_path / "kept")
    scanned_config = tiny_config(tmp_path / "scanned")
    scanned_config.data.feature_cache_max_gb = 1e-9
    kept = Trainer(kept_config, tmp_path / "kept", data=tiny_data()).fit()
    scanned = Trainer(scanned_config, tmp_path / "scanned", data=tiny_data()).fit()
    rounds = sum(r["stage"] == "last_layer" for r in kept.metrics)
    assert rounds == 2
    assert stages["kept"] == [0] * rounds
    assert stages["scanned"] == [len(tiny_data().train_indices)] * rounds
    wa, wb = load_file(kept.model_dir / "model.safetensors"), load_file(scanned.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, config, stop: int) -> None:
    """Run ``config`` until step ``stop`` is checkpointed, then stop as a kill would."""
    original = TrainerClass._after_step

    def crash(self, step, val):
        original(self, step, val)
        if step.index == stop:
            raise Interrupted

    monkeypatch.setattr(TrainerClass, "_after_step", crash)
    with pytest.raises(Interrupted):
        Trainer(config, data=tiny_data()).fit()
    monkeypatch.setattr(TrainerClass, "_after_step", original)


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_resume_ends_with_the_same_weights(tmp_path, monkeypatch, stop_after):
    full = Trainer(tiny_config(tmp_path / "full"), data=tiny_data()).fit()
    interrupt_after(monkeypatch, tiny_config(tmp_path / "cut"), stop_after)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit()
    resumed = Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit(resume=True)
    wa = load_file(full.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["stage"] for r in full.metrics] == [r["stage"] for r in resumed.metrics]


def test_a_checkpoint_keeps_only_the_optimisers_later_steps_use(tmp_path, monkeypatch):
    """A finished stage's Adam moments are not written again after every later step; resuming
    right after the last joint epoch (no joint state kept) still ends with the same weights."""
    config = tiny_config(tmp_path / "full")
    config.output.keep_checkpoints = 100
    full = Trainer(config, data=tiny_data())
    result = full.fit()
    plan = full.plan
    for path in sorted((tmp_path / "full" / "run" / "checkpoints").iterdir()):
        index = int(path.name.split("-")[1])
        stored = {name for name, _ in json.loads((path / "state.json").read_text())["optimizers"]["__dict__"]}
        later = {s.stage for s in plan[index + 1:]} & {"warm", "joint", "last_layer", "pretrain"}
        assert stored <= later, (index, stored, later)
        if "joint" in later and index >= 1:  # the joint Adam has moments once a joint step ran
            assert "joint" in stored, index
    last_joint = max(s.index for s in plan if s.stage == "joint")
    assert last_joint < len(plan) - 1
    interrupt_after(monkeypatch, tiny_config(tmp_path / "cut"), last_joint)
    cut = tmp_path / "cut" / "run" / "checkpoints"
    newest = sorted(cut.iterdir())[-1]
    assert "joint" not in {name for name, _ in json.loads((newest / "state.json").read_text())["optimizers"]["__dict__"]}
    resumed = Trainer(tiny_config(tmp_path / "cut"), data=tiny_data()).fit(resume=True)
    wa = load_file(result.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_written_in_the_background_holds_the_run_as_it_was_after_its_step(tmp_path, monkeypatch):
    """Checkpoints are written while the next step trains (and changes the weights and Adam
    moments in place): each must still hold its own step's tensors and bookkeeping."""
    import importlib
    import time

    state = importlib.import_module("protopnet.train.state")
    real_save = state.save_tensors

    def slow_save(path, tensors):  # the next step is well under way before a file is written
        time.sleep(0.3)
        return real_save(path, tensors)

    monkeypatch.setattr(state, "save_tensors", slow_save)
    seen = {}
    original = TrainerClass._after_step

    def record(self, step, val):
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.next_step = step.index + 1  # what _after_step sets before it checkpoints
        extra = {k: v.detach().clone() for k, v in self._state()[1].items()}
        seen[step.index] = (model, extra, len(self.metrics))
        original(self, step, val)

    monkeypatch.setattr(TrainerClass, "_after_step", record)
    config = tiny_config(tmp_path)
    config.output.keep_checkpoints = 100
    trainer = Trainer(config, data=tiny_data())
    trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step-{i:05d}" for i in range(len(trainer.plan))]
    changed = 0
    for index, (model, extra, metrics) in seen.items():
        written = json.loads((root / f"step-{index:05d}" / "state.json").read_text())
        assert written["next_step"] == index + 1 and len(written["metrics"]) == metrics == index + 1
        saved = load_file(root / f"step-{index:05d}" / "model.safetensors")
        assert sorted(saved) == sorted(model) and all(torch.equal(saved[k], model[k]) for k in model), index
        saved = load_file(root / f"step-{index:05d}" / "state.safetensors")
        assert sorted(saved) == sorted(extra) and all(torch.equal(saved[k], extra[k]) for k in extra), index
        later = seen.get(index + 1)
        changed += later is not None and any(not torch.equal(model[k], later[0][k]) for k in model)
    assert changed >= len(trainer.plan) - 2  # the steps did change the weights the checkpoints froze


@pytest.mark.skipif(sys.platform != "linux", reason="threads have nice values of their own on Linux only")
def test_the_background_checkpoint_runs_at_the_lowest_priority_and_the_training_thread_keeps_its_own(tmp_path):
    """The writer thread yields the cores to the training step's kernels; lowering it must not
    lower the process (the training threads) with it."""
    import importlib
    import os
    import threading

    state = importlib.import_module("protopnet.train.state")
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def work():
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        (tmp_path / "written").write_text("ok")

    pending = state._BackgroundWrite("step 0", work)
    pending.thread.join()
    assert pending.error is None and (tmp_path / "written").read_text() == "ok"
    assert seen["writer"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == before  # the process as a whole


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch):
    full = Trainer(tiny_config(tmp_path / "full"), data=tiny_data()).fit()
    interrupt_after(monkeypatch, tiny_config(tmp_path / "cut"), 3)
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


# -- pruning as a stage (paper Section 2.6) --------------------------------------------------------

def test_prune_comes_once_after_the_final_push():
    config = Config.from_dict({"schedule": {"epochs": 12, "warm_epochs": 2, "push_start": 4, "push_every": 4, "prune": True}})
    stages = [(s.stage, s.epoch) for s in plan_schedule(config.schedule)]
    assert stages.count(("prune", 11)) == 1 and sum(stage == "prune" for stage, _ in stages) == 1
    at = stages.index(("push", 11))
    assert stages[at : at + 3] == [("push", 11), ("prune", 11), ("last_layer", 11)]
    assert stages[stages.index(("push", 4)) + 1] == ("last_layer", 4)


def test_prune_needs_a_push():
    with pytest.raises(ValueError, match="prune"):
        Config.from_dict({"schedule": {"epochs": 3, "push_start": 5, "push_at_end": False, "prune": True}})
    with pytest.raises(ValueError, match="prune_threshold"):
        Config.from_dict({"schedule": {"prune": True, "prune_k": 4, "prune_threshold": 5}})


def _pruning_config(tmp_path):
    # only prototypes with at least 3 of their 4 nearest patches from their own class survive
    config = tiny_config(tmp_path, prune=True, prune_k=4, prune_threshold=3)
    config.output.keep_checkpoints = 100
    return config


def test_a_pruning_run_keeps_the_pruned_model(tmp_path):
    from protopnet.checkpoint import load_tensors
    from protopnet.prune import prune

    config = _pruning_config(tmp_path)
    result = Trainer(config, data=tiny_data()).fit()
    model = load_model(result.model_dir)
    event = next(h for h in model.history if h["event"] == "prune")
    record = next(r for r in result.metrics if r["stage"] == "prune")
    assert record["prototypes_before"] == 6 and record["prototypes_after"] == model.num_prototypes == len(event["what"]["kept"])
    assert result.metrics[-1]["stage"] == "last_layer"  # re-fitted after pruning, and that is the model kept

    # the same rule applied by hand to the model before pruning (the checkpoint of the final push)
    plan = plan_schedule(config.schedule)
    push_step = next(s.index for s in plan if s.stage == "prune") - 1
    before = TrainerClass(config, data=tiny_data()).model
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{push_step:05d}" / "state.json").read_text())
    before.load_state_dict(load_tensors(tmp_path / "run" / "checkpoints" / f"step-{push_step:05d}" / "model.safetensors", state["model_sha256"]))
    data = tiny_data()
    expected = prune(before, data.clean, k=4, threshold=3, indices=data.train_indices, dry_run=True)
    assert 0 < len(expected.removed) < 6  # the case tests something
    assert event["what"]["removed"] == expected.removed and event["what"]["kept"] == expected.kept
    assert torch.equal(model.prototypes, before.prototypes.detach()[event["what"]["kept"]])
    assert model.prototype_classes.tolist() == before.prototype_classes[event["what"]["kept"]].tolist()
    # provenance follows the renumbering: each kept prototype is still its source's patch
    assert [e["prototype"] for e in model.provenance] == list(range(model.num_prototypes))
    for entry in model.provenance:
        image = data.clean.to_tensor(data.clean.load_image(entry["dataset_index"]))[None]
        with torch.no_grad():
            assert model(image).min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=1e-4)
    assert len(event["removed_provenance"]) == len(event["what"]["removed"])


@pytest.mark.parametrize("stop_at", ["prune", "last_layer"])
def test_resume_after_pruning_ends_with_the_same_weights(tmp_path, monkeypatch, stop_at):
    full = Trainer(_pruning_config(tmp_path / "full"), data=tiny_data()).fit()
    stop = next(s.index for s in plan_schedule(_pruning_config(tmp_path).schedule) if s.stage == "prune")
    stop += stop_at == "last_layer"
    interrupt_after(monkeypatch, _pruning_config(tmp_path / "cut"), stop)
    resumed = Trainer(_pruning_config(tmp_path / "cut"), data=tiny_data()).fit(resume=True)
    wa = load_file(full.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- fixed augmented views, the frozen-feature cache, prototypes started on patches ----------------

def _cache_config(tmp_path, cached):
    config = tiny_config(tmp_path, epochs=4, warm_epochs=2, push_start=9, push_at_end=False, frozen_backbone_blocks=2)
    config.model.backbone = "tiny_cnn_gn"  # GroupNorm: frozen layers compute the same in train and eval mode
    config.data.feature_cache = cached
    return config


def test_the_feature_cache_trains_what_the_pictures_train(tmp_path, monkeypatch):
    weights = []
    for cached in (False, True):
        trainer = Trainer(_cache_config(tmp_path / str(cached), cached), data=tiny_data())
        loads = []
        original = ColourDataset.load_image
        monkeypatch.setattr(ColourDataset, "load_image", lambda self, i: (loads.append(i), original(self, i))[1])
        for step in trainer.plan:
            loads.clear()
            trainer._train_epoch(step)
            if cached and step.index > 0:  # the first epoch caches the frozen blocks, for the joint epochs too
                assert loads == [], step
        monkeypatch.setattr(ColourDataset, "load_image", original)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    uncached, cached = weights
    assert uncached.keys() == cached.keys()
    for k in uncached:
        assert torch.allclose(uncached[k].float(), cached[k].float(), atol=1e-4, rtol=1e-4), k
    fresh = TrainerClass(_cache_config(tmp_path / "fresh", False), data=tiny_data()).model.state_dict()
    assert not torch.allclose(fresh["prototypes"], cached["prototypes"])  # it did train
    trained = [k for k in fresh if k.startswith("features") and not torch.equal(fresh[k], cached[k])]
    assert trained  # the unfrozen blocks trained in the joint epochs


def _views_data(views=3):
    from protopnet.data import AugmentedViews, online_augmentation

    data = tiny_data()
    train = AugmentedViews(data.clean, online_augmentation(32), views=views, seed=4)
    return RunData(train, data.clean, data.test, data.train_indices, data.val_indices, train.items_of(data.train_indices))


def test_the_last_layer_reads_the_frozen_blocks_cache_and_gets_what_the_pictures_give(tmp_path, monkeypatch):
    from protopnet.train.feature_cache import FrozenFeatureCache
    from protopnet.train.last_layer import collect_similarities, collect_similarities_from_cache

    config = _cache_config(tmp_path, True)
    config.data.augment, config.data.augment_views = True, 3
    config.schedule.push_at_end = True
    data = _views_data()
    trainer = Trainer(config, data=data)
    loads = []
    original = ColourDataset.load_image
    monkeypatch.setattr(ColourDataset, "load_image", lambda self, i: (loads.append(i), original(self, i))[1])
    for step in trainer.plan:
        loads.clear()
        if step.stage in ("warm", "joint"):
            trainer._train_epoch(step)
        elif step.stage == "push":
            trainer._push(step)
        elif step.stage == "last_layer":
            prefix = trainer._feature_caches["prefix"]
            assert prefix is not None and prefix.frozen_blocks == 2
            cached = collect_similarities_from_cache(trainer.model, prefix, data.training_items, batch_size=7)
            trainer._last_layer(step)
            assert loads == []  # no picture decoded: the later blocks ran on the cache
    monkeypatch.setattr(ColourDataset, "load_image", original)
    # against the pictures, through the whole backbone (the model before the last-layer stage,
    # whose similarities do not depend on the last layer)
    sims, labels, indices = collect_similarities(trainer.model, data.train, indices=data.training_items, batch_size=5)
    assert torch.equal(cached[2], indices) and torch.equal(cached[1], labels)
    assert torch.allclose(cached[0], sims, atol=1e-4, rtol=1e-4)
    assert sims.std() > 0  # not a constant that would match anything
    # the warm-up cache computed from the prefix cache is the whole backbone's output
    whole = FrozenFeatureCache.build(trainer.model, None, data.train, data.training_items, device=torch.device("cpu"), precision="fp32",
                                     channels_last=False, batch_size=9, num_workers=0, max_bytes=1e9)
    extended = prefix.extended(trainer.model, None, precision="fp32", channels_last=False, batch_size=4)
    assert extended.frozen_blocks is None and extended.tensors.shape == whole.tensors.shape
    assert torch.allclose(extended.tensors, whole.tensors, atol=1e-5, rtol=1e-5)
    assert torch.equal(extended.labels, whole.labels)
    assert prefix.extended(trainer.model, None, precision="fp32", channels_last=False, batch_size=4, max_bytes=10) is None


def test_the_feature_cache_needs_fixed_pictures():
    with pytest.raises(ValueError, match="feature_cache"):
        Config.from_dict({"data": {"augment": True, "feature_cache": True}})
    Config.from_dict({"data": {"augment": True, "augment_views": 4, "feature_cache": True}})


def test_patch_initialised_prototypes_are_patches_of_their_class(tmp_path):
    config = tiny_config(tmp_path)
    config.model.prototype_init = "patches"
    data = tiny_data()
    trainer = Trainer(config, data=data)
    model = trainer.model
    uniform = model.prototypes.detach().clone()
    trainer._initialise_prototypes()
    assert not torch.equal(uniform, model.prototypes)
    model.eval()
    with torch.no_grad():
        for j, k in enumerate(model.prototype_classes.tolist()):
            own = [i for i in data.train_indices if data.clean.targets[i] == k]
            images = torch.stack([data.clean.to_tensor(data.clean.load_image(i)) for i in own])
            z = model.latent(images)  # (N, D, H, W)
            distances = ((z - model.prototypes[j].view(1, -1, 1, 1)) ** 2).sum(1)  # (N, H, W)
            assert distances.min().item() == pytest.approx(0.0, abs=1e-6)
            others = [i for i in data.train_indices if data.clean.targets[i] != k]
            z_other = model.latent(torch.stack([data.clean.to_tensor(data.clean.load_image(i)) for i in others]))
            assert ((z_other - model.prototypes[j].view(1, -1, 1, 1)) ** 2).sum(1).min().item() > 1e-6


def test_frozen_batchnorm_keeps_the_running_statistics(tmp_path):
    changed = {}
    for frozen in (False, True):
        config = tiny_config(tmp_path / str(frozen), epochs=2, warm_epochs=1, push_start=5, push_at_end=False)
        config.schedule.freeze_backbone_batchnorm = frozen
        trainer = Trainer(config, data=tiny_data())
        stats = {k: v.clone() for k, v in trainer.model.features.state_dict().items() if "running" in k}
        assert stats  # tiny_cnn has batch norm
        for step in trainer.plan:
            trainer._train_epoch(step)
        after = trainer.model.features.state_dict()
        changed[frozen] = [k for k in stats if not torch.equal(stats[k], after[k])]
    assert changed[False] and changed[True] == []


# -- weight averaging (optim.ema_decay) -------------------------------------------------------

def test_weight_averaging_ends_with_the_moving_average_of_the_weights(tmp_path):
    """No push: the final model is the average of the warm-up and joint weights, step by step."""
    config = tiny_config(tmp_path, optim={"ema_decay": 0.7}, epochs=3, push_start=10, push_at_end=False)
    trainer = Trainer(config, data=tiny_data())
    snapshots, handle = record_trajectory(trainer.model)
    try:
        result = trainer.fit()
    finally:
        handle.remove()
    assert len(snapshots) == 3 * 4  # 3 epochs of 4 batches (21 training images, batch 6)
    expected = moving_average(snapshots, 0.7)
    final = list(load_model(result.model_dir).parameters())
    names = [n for n, _ in trainer.model.named_parameters()]
    for name, got, want, last in zip(names, final, expected, snapshots[-1]):
        assert torch.allclose(got, want, atol=1e-6), name
    # and it is not the last weights trained
    assert not torch.allclose(final[names.index("prototypes")], snapshots[-1][names.index("prototypes")], atol=1e-4)


def test_push_works_on_the_averaged_weights_and_the_average_restarts_after_it(tmp_path):
    """Push after epoch 1 and at the end: each push sees the average since the one before, and
    after the final push every prototype is a real training patch of the averaged network."""
    config = tiny_config(tmp_path, optim={"ema_decay": 0.6})  # warm 0, joint 1, push, joint 2-3, push
    trainer = Trainer(config, data=tiny_data())
    snapshots, handle = record_trajectory(trainer.model, lambda: (trainer.optimizers["warm"], trainer.optimizers["joint"]))
    try:
        result = trainer.fit()
    finally:
        handle.remove()
    assert len(snapshots) == 4 * 4
    names = [n for n, _ in trainer.model.named_parameters()]
    model = load_model(result.model_dir)
    final = dict(model.named_parameters())
    # the second average starts from the pushed model: the first snapshot after the first push
    # round is one step of training on it, so the average restarts at snapshots[8]
    expected = moving_average(snapshots[8:], 0.6)
    for name, want in zip(names, expected):
        if name.startswith(("features", "add_on")):  # push moves prototypes, the last layer stage the last layer
            assert torch.allclose(final[name], want, atol=1e-6), name
    data = tiny_data()
    for entry in model.provenance:
        image = data.clean.to_tensor(data.clean.load_image(entry["dataset_index"]))[None]
        with torch.no_grad():
            assert model(image).min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_with_weight_averaging_ends_with_the_same_weights(tmp_path, monkeypatch, stop_after):
    """The average is part of the checkpoint: a run stopped mid-average resumes to the same model."""
    full = Trainer(tiny_config(tmp_path / "full", optim={"ema_decay": 0.8}), data=tiny_data()).fit()
    interrupt_after(monkeypatch, tiny_config(tmp_path / "cut", optim={"ema_decay": 0.8}), stop_after)
    saved = load_file(sorted((tmp_path / "cut" / "run" / "checkpoints").glob("step-*"))[-1] / "state.safetensors")
    assert any(k.startswith("weight_average.") for k in saved)
    resumed = Trainer(tiny_config(tmp_path / "cut", optim={"ema_decay": 0.8}), data=tiny_data()).fit(resume=True)
    wa = load_file(full.model_dir / "model.safetensors")
    wb = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = load_file(Trainer(tiny_config(tmp_path / "plain"), data=tiny_data()).fit().model_dir / "model.safetensors")
    assert not torch.allclose(wa["add_on.0.weight"], plain["add_on.0.weight"])  # averaging changed the model


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), 2])
def test_ema_decay_must_be_below_one(decay):
    from protopnet.config import ConfigError

    with pytest.raises(ConfigError, match="optim.ema_decay"):
        Config.from_dict({"optim": {"ema_decay": decay}})
