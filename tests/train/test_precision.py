"""bf16 autocast and channels_last on the CPU: every stage runs under them (the backbone really
computes in bfloat16 on channels_last tensors), the prototype distances stay float32, and what the
stages compute stays close to float32."""

from __future__ import annotations

import json

import math

import pytest
import torch

from protopnet.config import Config
from protopnet.runtime import autocast, resolve_precision
from protopnet.train import RunData, Trainer
from protopnet.train.evaluate import predict_logits
from protopnet.train.last_layer import collect_similarities
from protopnet.train.push import push_prototypes

from conftest import ColourDataset, tiny_model


def _config(tmp_path, precision: str, channels_last: bool) -> Config:
    return Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"image_size": 32, "batch_size": 6, "test_batch_size": 8, "push_batch_size": 5, "augment": False},
            "schedule": {"epochs": 2, "warm_epochs": 1, "push_start": 1, "push_every": 1, "last_layer_iterations": 2},
            "run": {"seed": 1, "device": "cpu", "precision": precision, "channels_last": channels_last},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def _data() -> RunData:
    train = ColourDataset(num_classes=3, per_class=6, seed=0)
    test = ColourDataset(num_classes=3, per_class=2, seed=1)
    return RunData(train, train, test, [i for i in range(len(train)) if i % 6], [0, 6, 12])


def _record_first_conv(model) -> list[tuple[torch.dtype, bool, bool]]:
    """(output dtype, input channels_last, grad enabled) of every call of the first convolution."""
    calls = []
    conv = next(m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda module, args, out: calls.append((out.dtype, args[0].is_contiguous(memory_format=torch.channels_last), torch.is_grad_enabled()))
    )
    return calls


def test_a_whole_run_in_bf16_and_channels_last_runs_every_stage_that_way(tmp_path):
    trainer = Trainer(_config(tmp_path, "bf16", True), data=_data())
    calls = _record_first_conv(trainer.model)
    result = trainer.fit()
    stages = [r["stage"] for r in result.metrics]
    assert stages == ["warm", "joint", "push", "last_layer"]
    # training (grad enabled) and push / last-layer / validation passes (no grad): all bf16 on channels_last
    assert {c[2] for c in calls} == {True, False}
    assert all(dtype == torch.bfloat16 and channels_last for dtype, channels_last, _ in calls), set(calls)
    assert trainer.model.features.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    for record in result.metrics:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (record["stage"], key)
    assert 0 <= result.test["accuracy"] <= 1 and result.test["n"] == 6


def test_the_selected_model_is_tested_in_float32_in_the_run_s_layout(tmp_path, monkeypatch):
    """A bf16 channels_last run reports the test accuracy of its saved model computed in float32
    (never silently less accurate), on channels_last tensors (the faster float32 convolutions on a
    CPU): the figure ``predict_logits`` gives the loaded model that way."""
    import importlib

    loop = importlib.import_module("protopnet.train.loop")  # protopnet.train is also a function
    from protopnet import load_model
    from protopnet.train.evaluate import accuracy_report

    seen = []
    original = loop.predict_logits

    def recorded(model, dataset, **kwargs):
        calls = _record_first_conv(model)
        out = original(model, dataset, **kwargs)
        seen.append((model, calls))
        return out

    trainer = Trainer(_config(tmp_path, "bf16", True), data=_data())
    trainer._validate = lambda: None  # only the final passes go through loop.predict_logits
    monkeypatch.setattr(loop, "predict_logits", recorded)
    result = trainer.fit()
    assert len(seen) == 2  # validation, then test
    for model, calls in seen:
        assert model is not trainer.model  # the saved model, read back
        assert calls and all(dtype == torch.float32 and channels_last for dtype, channels_last, _ in calls), set(calls)
    data = _data()
    logits, labels, _ = original(load_model(result.model_dir), data.test, batch_size=8, precision="fp32", channels_last=True)
    assert result.test == accuracy_report(logits, labels, trainer.data.class_names)


@pytest.mark.parametrize("channels_last", [False, True])
def test_distances_stay_float32_and_outputs_stay_close_to_fp32(channels_last):
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_dim=8).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with autocast(torch.device("cpu"), "bf16"):
            z = model.latent(x.to(memory_format=torch.channels_last) if channels_last else x)
            out = model(x)
    assert z.dtype == torch.bfloat16  # the backbone and add-on really ran in bf16
    assert out.distances.dtype == torch.float32 and out.min_distances.dtype == torch.float32
    assert out.similarities.dtype == torch.float32
    scale = float(reference.distances.abs().max())
    assert float((out.distances - reference.distances).abs().max()) <= 0.03 * scale
    # logits sum terms of both signs: the error is relative to the size of the terms, not of the sum
    terms = float((reference.similarities.abs() @ model.last_layer.weight.detach().abs().t()).max())
    assert float((out.logits.float() - reference.logits).abs().max()) <= 0.03 * terms


def test_each_stage_in_bf16_channels_last_matches_fp32():
    """Evaluation logits and last-layer similarity vectors, then push: bf16 + channels_last
    against fp32. (Logits and similarities are compared before the push: afterwards a prototype
    sits on a real patch, distances of look-alike patches are ~0, and there the log activation
    turns bf16's rounding of the latent into large changes of similarity — a property of the
    activation, not an error of the arithmetic.)"""
    data = ColourDataset(num_classes=3, per_class=5, seed=2)
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_dim=8)
    fast = tiny_model(num_classes=3, prototypes_per_class=2, prototype_dim=8)
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    fast_calls = _record_first_conv(fast)
    options = dict(precision="bf16", channels_last=True)

    logits, labels, _ = predict_logits(model, data, batch_size=7)
    logits_bf16, labels_bf16, _ = predict_logits(fast, data, batch_size=7, **options)
    assert torch.equal(labels, labels_bf16)

    sims, _, _ = collect_similarities(model, data, batch_size=7)
    sims_bf16, _, _ = collect_similarities(fast, data, batch_size=7, **options)
    assert sims_bf16.dtype == torch.float32
    assert float((sims - sims_bf16).abs().max()) <= 0.05 * float(sims.abs().max())
    # logits sum terms of both signs: the error is relative to the size of the terms
    terms = float((sims.abs() @ model.last_layer.weight.detach().abs().t()).max())
    assert float((logits - logits_bf16).abs().max()) <= 0.03 * terms

    pushed = push_prototypes(model, data, batch_size=7)
    pushed_bf16 = push_prototypes(fast, data, batch_size=7, **options)
    assert fast.prototypes.dtype == torch.float32
    same = [p["dataset_index"] == q["dataset_index"] and p["position"] == q["position"] for p, q in zip(pushed, pushed_bf16)]
    assert sum(same) >= len(pushed) - 1  # a near tie may go either way in bf16
    for p, q in zip(pushed, pushed_bf16):
        assert math.isclose(p["distance"], q["distance"], rel_tol=0.05, abs_tol=0.02)
    moved = (model.prototypes - fast.prototypes).detach().abs().flatten(1).amax(1)
    assert float(moved[torch.tensor(same)].max()) <= 0.02  # the same patch, its latent rounded to bf16
    assert fast_calls and all(dtype == torch.bfloat16 and cl for dtype, cl, _ in fast_calls)


def test_bf16_on_a_gpu_without_bf16_falls_back_to_fp16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(torch.device("cuda"), "bf16") == "fp16"
    assert "fp16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(torch.device("cuda"), "bf16") == "bf16"
    assert resolve_precision(torch.device("cpu"), "bf16") == "bf16"
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(ValueError, match="GPU"):
        resolve_precision(torch.device("cpu"), "fp16")


def test_one_settings_object_runs_a_pass_as_the_separate_keywords_do():
    """A RunSettings carries batch size, workers, device, precision and layout; a keyword given
    beside it replaces that field, and a settings object is frozen."""
    import dataclasses

    from protopnet.runtime import RunSettings

    data = ColourDataset(num_classes=3, per_class=4, seed=3)
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_dim=8)
    settings = RunSettings(batch_size=5, device="cpu", precision="bf16", channels_last=True)
    logits, labels, idx = predict_logits(model, data, batch_size=5, device="cpu", precision="bf16", channels_last=True)
    logits_s, labels_s, idx_s = predict_logits(model, data, settings=settings)
    assert torch.equal(logits, logits_s) and torch.equal(labels, labels_s) and torch.equal(idx, idx_s)
    fp32, _, _ = predict_logits(model, data, batch_size=5)
    overridden, _, _ = predict_logits(model, data, settings=settings, precision="fp32", channels_last=False)
    assert torch.equal(fp32, overridden)

    merged = RunSettings.merged(settings, batch_size=9, num_workers=None)
    assert (merged.batch_size, merged.num_workers, merged.precision) == (9, 0, "bf16")
    assert RunSettings.merged(None, 75).batch_size == 75
    with pytest.raises(TypeError, match="batchsize"):
        predict_logits(model, data, batchsize=5)  # a misspelt setting is refused, not ignored
    assert RunSettings().for_model(model).device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 1  # type: ignore[misc]


def _uncapped(monkeypatch):
    """No oneDNN instruction-set cap (the CI's AVX2 pass sets one)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize(
    "cap, expected",
    [("AVX2", "fp32"), ("avx512_core", "fp32"), ("SSE41", "fp32"), ("AVX512_CORE_BF16", "bf16"), ("AVX512_CORE_AMX", "bf16"), ("ALL", "bf16"), ("", "bf16")],
)
def test_auto_precision_follows_a_onednn_instruction_set_cap(monkeypatch, caplog, cap, expected):
    _uncapped(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    with caplog.at_level("INFO", logger="protopnet.runtime"):
        assert resolve_precision(torch.device("cpu"), "auto") == expected
    if expected == "fp32":
        assert f"ONEDNN_MAX_CPU_ISA={cap} caps oneDNN below bfloat16" in caplog.text
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # oneDNN's older name for the same cap
    caplog.clear()
    with caplog.at_level("INFO", logger="protopnet.runtime"):
        assert resolve_precision(torch.device("cpu"), "auto") == expected
    if expected == "fp32":
        assert f"DNNL_MAX_CPU_ISA={cap} caps oneDNN below bfloat16" in caplog.text


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"), (False, False, "fp32")],
)
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_native_bfloat16(monkeypatch, caplog, amx, avx512_bf16, expected):
    _uncapped(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    with caplog.at_level("INFO", logger="protopnet.runtime"):
        assert resolve_precision(torch.device("cpu"), "auto") == expected
    assert f"precision auto: {expected} on cpu" in caplog.text  # the choice is logged with its reason
    # an explicit value still wins, whatever the hardware
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"
    assert resolve_precision(torch.device("cpu"), "bf16") == "bf16"


def test_auto_precision_is_fp32_on_a_gpu_without_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(torch.device("cuda"), "auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"


def test_a_trainer_with_auto_precision_runs_what_the_cpu_supports(tmp_path, monkeypatch):
    _uncapped(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert Trainer(_config(tmp_path, "auto", False), data=_data()).precision == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    trainer = Trainer(_config(tmp_path / "b", "auto", True), data=_data())
    assert trainer.precision == "bf16" and trainer.settings.precision == "bf16"
    result = trainer.fit()
    # the run records what 'auto' became; the saved config keeps 'auto' (retraining elsewhere re-resolves)
    assert json.loads((result.out_dir / "results.json").read_text())["precision"] == "bf16"
    assert "precision: auto" in (result.model_dir / "config.yaml").read_text()
    assert "auto (bf16 where the hardware computes it natively, else fp32) on cpu" in (result.model_dir / "README.md").read_text()


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="auto"):
        resolve_precision(torch.device("cpu"), "fp8")
