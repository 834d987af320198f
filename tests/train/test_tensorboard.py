"""run.tensorboard: the event files hold every scalar of metrics.jsonl, the learning rates each
step trained with, and a grid of prototype patches at each push; read back with TensorBoard's own
EventAccumulator."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from protopnet.train import Trainer, plan_schedule  # noqa: E402

from protopnet.train.loop import Trainer as TrainerClass  # noqa: E402

from conftest import tiny_config, tiny_data  # noqa: E402


def read_events(run):
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    return scalars, images


def test_the_event_files_hold_the_runs_scalars_learning_rates_and_push_patches(tmp_path):
    config = tiny_config(tmp_path, prune=True, prune_k=4, prune_threshold=3, joint_lr_step=1, joint_lr_gamma=0.5)
    config.run.tensorboard = True
    Trainer(config, data=tiny_data()).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars, images = read_events(run)

    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{record['stage']}/{key}", []).append((record["step"], value))
    written = {tag: values for tag, values in scalars.items() if not tag.startswith("lr/")}
    assert written.keys() == expected.keys()
    for tag, values in expected.items():
        assert [s for s, _ in written[tag]] == [s for s, _ in values], tag
        assert [v for _, v in written[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag  # stored as float32

    # learning rates: the warm-up's as configured, the joint ones halved every epoch (StepLR)
    plan = plan_schedule(config.schedule)
    warm = [s.index for s in plan if s.stage == "warm"]
    joint = [s.index for s in plan if s.stage == "joint"]
    assert scalars["lr/warm/add_on"] == [(i, pytest.approx(config.optim.warm_add_on_lr)) for i in warm]
    assert [v for _, v in scalars["lr/joint/backbone"]] == pytest.approx([config.optim.backbone_lr * 0.5**n for n in range(len(joint))])
    assert [v for _, v in scalars["lr/joint/backbone"]] == pytest.approx([r["lr_backbone"] for r in records if r["stage"] == "joint"])
    assert {"lr/joint/add_on", "lr/joint/prototypes", "lr/warm/prototypes", "lr/last_layer/last_layer"} <= scalars.keys()

    # one grid of source patches per push: 3 classes (rows) x 2 prototypes, 48 px cells, 2 px padding
    pushes = [s.index for s in plan if s.stage == "push"]
    grids = images["push/prototype_patches"]
    assert [g.step for g in grids] == pushes
    assert (grids[0].width, grids[0].height) == (2 + 2 * 50, 2 + 3 * 50)


def test_tensorboard_off_writes_nothing_and_a_resumed_run_shows_each_step_once(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    Trainer(config, data=tiny_data()).fit()
    assert not (tmp_path / "run" / "tensorboard").exists()

    config = tiny_config(tmp_path / "resumed")
    config.run.tensorboard = True
    plan = plan_schedule(config.schedule)
    original = TrainerClass._after_step

    def killed(self, step, val):  # step 3 ran and was logged, but never checkpointed
        if step.index == 3:
            raise KeyboardInterrupt
        original(self, step, val)

    monkeypatch.setattr(TrainerClass, "_after_step", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, data=tiny_data()).fit()
    monkeypatch.setattr(TrainerClass, "_after_step", original)
    Trainer(config, data=tiny_data()).fit(resume=True)  # runs step 3 again
    scalars, _ = read_events(tmp_path / "resumed" / "run")
    steps = sorted(step for values in (scalars[t] for t in scalars if t.endswith("/seconds")) for step, _ in values)
    assert steps == list(range(len(plan)))
