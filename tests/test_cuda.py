"""The GPU paths: a whole run on CUDA in fp32, bf16 and fp16 (with its GradScaler), push on the GPU
against push on the CPU, and a model trained on the GPU read back on a CPU. Skipped where PyTorch
sees no CUDA device (CI); run them on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import math

import pytest
import torch

from protopnet.checkpoint import load_model, save_model
from protopnet.config import Config
from protopnet.losses import protopnet_loss
from protopnet.train import RunData, Trainer
from protopnet.train.evaluate import predict_logits
from protopnet.train.last_layer import collect_similarities
from protopnet.train.push import push_prototypes

from conftest import ColourDataset, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(tmp_path, precision: str, channels_last: bool = False) -> Config:
    return Config.from_dict(
        {
            "model": {"backbone": "tiny_cnn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 8},
            "data": {"image_size": 32, "batch_size": 6, "test_batch_size": 8, "push_batch_size": 5, "augment": False},
            "schedule": {"epochs": 3, "warm_epochs": 1, "push_start": 2, "push_every": 1, "last_layer_iterations": 5},
            "optim": {"warm_add_on_lr": 0.01, "warm_prototypes_lr": 0.01, "add_on_lr": 0.01, "prototypes_lr": 0.01, "backbone_lr": 0.01},
            "run": {"seed": 1, "device": "cuda", "precision": precision, "channels_last": channels_last},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def _data() -> RunData:
    train = ColourDataset(num_classes=3, per_class=8, seed=0)
    test = ColourDataset(num_classes=3, per_class=4, seed=1)
    return RunData(train, train, test, list(range(len(train))), [])


@pytest.fixture
def no_tf32():
    """TF32 would round the GPU's matrix products to 10-bit mantissas: compare true fp32 with fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def predict_similarities(model, dataset) -> torch.Tensor:
    """(N, M) similarity vectors of a CPU model over a dataset."""
    images = torch.stack([dataset.to_tensor(dataset.load_image(i)) for i in range(len(dataset))])
    with torch.no_grad():
        return model.eval()(images).similarities


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if r.get("loss") is not None]


def test_each_stage_on_the_gpu_computes_what_it_computes_on_the_cpu(no_tf32):
    """From the same weights: the training loss and every gradient, evaluation logits, the
    last-layer similarity vectors and push agree between GPU and CPU in fp32. (Whole runs are
    compared stage by stage: over several epochs Adam amplifies rounding differences on so small a
    model, on one device too — channels_last against contiguous diverges as much.)"""
    data = ColourDataset(num_classes=3, per_class=5, seed=3)
    cpu, gpu = tiny_model(seed=7), tiny_model(seed=7)
    gpu = gpu.cuda()
    images = torch.stack([data.to_tensor(data.load_image(i)) for i in range(len(data))])
    labels = torch.tensor(data.targets)
    grads = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        out = model(images.to(device))
        loss, _ = protopnet_loss(out.logits, out.min_distances, labels.to(device), model.class_identity, model.last_layer.weight)
        model.zero_grad()
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = grads
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert cpu_grads.keys() == gpu_grads.keys() and len(cpu_grads) >= 5
    for name in cpu_grads:
        # summation order differs between the devices: compare against the gradient's own scale
        scale = float(cpu_grads[name].abs().max())
        error = float((gpu_grads[name] - cpu_grads[name]).abs().max())
        assert error <= 1e-4 * scale + 1e-7, (name, error, scale)

    cpu_logits, cpu_labels, _ = predict_logits(cpu, data, batch_size=4)
    gpu_logits, gpu_labels, _ = predict_logits(gpu, data, batch_size=4, device="cuda")
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    cpu_sims, _, _ = collect_similarities(cpu, data, batch_size=4)
    gpu_sims, _, _ = collect_similarities(gpu, data, batch_size=4, device="cuda")
    torch.testing.assert_close(gpu_sims.cpu(), cpu_sims, rtol=1e-4, atol=1e-4)


def test_a_whole_fp32_run_on_the_gpu_trains_pushes_and_saves(tmp_path, no_tf32):
    trainer = Trainer(_config(tmp_path, "fp32"), data=_data())
    assert trainer.model.prototypes.device.type == "cuda" and not trainer.scaler.is_enabled()
    result = trainer.fit()
    assert [r["stage"] for r in result.metrics] == ["warm", "joint", "joint", "push", "last_layer"]
    for record in result.metrics:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (record["stage"], key, value)
    # the saved model is read back on a CPU and predicts what the GPU model predicts
    model, data = load_model(result.model_dir, device="cpu"), _data()
    assert model.prototypes.device.type == "cpu"
    gpu_logits, labels, _ = predict_logits(trainer.model, data.test, batch_size=8, device="cuda")
    cpu_logits, cpu_labels, _ = predict_logits(model, data.test, batch_size=8, device="cpu")
    assert torch.equal(labels.cpu(), cpu_labels)
    # After push a prototype sits on a real patch, where the log activation's slope is ~1/epsilon:
    # rounding differences of the latent grow 10^4-fold in the similarities, so the logits are
    # compared against the size of the terms they sum (as in test_precision).
    sims = predict_similarities(model, data.test)
    terms = float((sims.abs() @ model.last_layer.weight.detach().abs().t()).max())
    assert float((gpu_logits.cpu() - cpu_logits).abs().max()) <= 0.01 * terms
    # after push every prototype is a latent patch of a real training picture of its class
    for entry in model.provenance:
        assert data.train.targets[entry["dataset_index"]] == entry["class_index"]
        image = data.train.to_tensor(data.train.load_image(entry["dataset_index"]))[None]
        with torch.no_grad():
            out = model(image)
        assert out.min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_low_precision_run_on_the_gpu_trains_pushes_and_saves(tmp_path, precision):
    trainer = Trainer(_config(tmp_path / precision, precision, channels_last=True), data=_data())
    # fp16 scales the loss (GradScaler), bf16 does not
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    calls = []
    conv = next(m for m in trainer.model.features.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda module, args, out: calls.append((out.dtype, out.device.type, args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    result = trainer.fit()
    assert [r["stage"] for r in result.metrics] == ["warm", "joint", "joint", "push", "last_layer"]
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert calls and set(calls) == {(expected, "cuda", True)}  # every stage: low precision, NHWC, on the GPU
    for record in result.metrics:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (record["stage"], key, value)
    assert trainer.model.prototypes.dtype == torch.float32  # the master weights stay fp32
    # the same run in fp32: the first (warm-up) epoch's loss agrees to low-precision rounding
    reference = Trainer(_config(tmp_path / "fp32", "fp32"), data=_data()).fit()
    assert _losses(result)[0] == pytest.approx(_losses(reference)[0], rel=0.02)
    # after push every prototype is a latent patch of a picture of its class (up to the rounding
    # of that latent in low precision), read back on the CPU
    model, data = load_model(result.model_dir), _data()
    for entry in model.provenance:
        assert data.train.targets[entry["dataset_index"]] == entry["class_index"]
        image = data.train.to_tensor(data.train.load_image(entry["dataset_index"]))[None]
        with torch.no_grad():
            out = model(image)
        assert out.min_distances[0, entry["prototype"]].item() == pytest.approx(0.0, abs=0.01)


def test_push_on_the_gpu_picks_the_patches_push_on_the_cpu_picks(no_tf32):
    data = ColourDataset(num_classes=3, per_class=6, seed=4)
    cpu, gpu = tiny_model(seed=5), tiny_model(seed=5)
    gpu = gpu.cuda()
    on_cpu = push_prototypes(cpu, data, batch_size=4)
    on_gpu = push_prototypes(gpu, data, batch_size=4, device="cuda")
    assert [(p["dataset_index"], p["position"]) for p in on_cpu] == [(p["dataset_index"], p["position"]) for p in on_gpu]
    for p, q in zip(on_cpu, on_gpu):
        assert q["distance"] == pytest.approx(p["distance"], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(gpu.prototypes.detach().cpu(), cpu.prototypes.detach(), rtol=1e-5, atol=1e-5)


def test_a_model_saved_from_the_gpu_round_trips_bit_for_bit(tmp_path):
    model = tiny_model(seed=2).cuda()
    save_model(model, tmp_path / "model")
    back = load_model(tmp_path / "model", device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
