"""``run.compile``: the training passes go through ``torch.compile`` and compute what the eager
passes compute (same losses and weights up to float rounding), and the option is off by default."""

from __future__ import annotations

import pytest
import torch

from protopnet.config import Config, ConfigError
from protopnet.train import RunData, Trainer

from conftest import ColourDataset


def _config(tmp_path, compiled: bool) -> Config:
    return Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"image_size": 32, "batch_size": 6, "test_batch_size": 8, "push_batch_size": 5, "augment": False},
            "schedule": {"epochs": 2, "warm_epochs": 1, "push_start": 1, "push_every": 1, "last_layer_iterations": 2},
            "run": {"seed": 1, "device": "cpu", "compile": compiled},
            "output": {"dir": str(tmp_path / ("compiled" if compiled else "eager"))},
        }
    )


def _data() -> RunData:
    train = ColourDataset(num_classes=3, per_class=6, seed=0)
    test = ColourDataset(num_classes=3, per_class=2, seed=1)
    return RunData(train, train, test, [i for i in range(len(train)) if i % 6], [0, 6, 12])


def test_compile_is_off_by_default_and_must_be_a_boolean():
    assert Config().run.compile is False
    with pytest.raises(ConfigError, match="run.compile"):
        Config.from_dict({"run": {"compile": "fast"}})


def test_a_compiled_run_goes_through_torch_compile_and_matches_the_eager_run(tmp_path, monkeypatch):
    compiled_modules = []
    real_compile = torch.compile

    def recording_compile(module, *args, **kwargs):
        compiled_modules.append(module)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = Trainer(_config(tmp_path, False), data=_data())
    eager_result = eager.fit()
    assert compiled_modules == []
    compiled = Trainer(_config(tmp_path, True), data=_data())
    compiled_result = compiled.fit()
    # one wrapper per training stage (warm-up and joint), reused across epochs
    assert len(compiled_modules) == 2
    assert [r["stage"] for r in compiled_result.metrics] == [r["stage"] for r in eager_result.metrics]
    for e, c in zip(eager_result.metrics, compiled_result.metrics):
        for key in ("loss", "ce", "cluster", "separation"):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-3, abs=1e-4), (e["stage"], key)
    diffs = {name: float((a - b).abs().max()) for (name, a), (_, b) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items())}
    assert max(diffs.values()) < 1e-3, diffs
