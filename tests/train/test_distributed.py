"""DistributedDataParallel on CPU: ``torchrun --nproc_per_node=2 -m protopnet train`` (gloo) must
train the model a single process trains on the same data and seed.

Each test trains the same tiny config twice — once in this process, once as two torchrun ranks —
and compares what the two runs leave on disk: the pushed prototypes' provenance (dataset index and
patch position) exactly, the weights within float tolerance, the metrics of every step and the final
validation and test accuracy. The backbone is ``tiny_cnn_gn`` (GroupNorm: per-image statistics; with
BatchNorm every rank would normalise with the statistics of its own slice of the batch, and
SyncBatchNorm needs GPUs). Rank 1 runs under an audit hook that records every write it makes inside
the run directory: it must make none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed  # every test here launches torchrun (two gloo processes)

from protopnet.checkpoint import load_model
from protopnet.data import build_dataset

from conftest import ColourDataset, free_port, torchrun, train_both

def _config_text(root: str, tmp_path: Path, **data: object) -> str:
    config = {
        "model": {"backbone": "tiny_cnn_gn", "pretrained": False, "prototypes_per_class": 2, "prototype_dim": 16},
        "data": {
            "root": root, "image_size": 32, "augment": False, "val_fraction": 0.2, "batch_size": 8,
            "test_batch_size": 7, "push_batch_size": 5, "synthetic_classes": 3, "synthetic_train_per_class": 7,
            "synthetic_test_per_class": 4, **data,
        },
        # warm-up, joint (the backbone's gradients must be synchronised too), push, last layer,
        # joint again, push, last layer
        "schedule": {"epochs": 3, "warm_epochs": 1, "push_start": 1, "push_every": 1, "push_at_end": True, "last_layer_iterations": 3},
        "run": {"seed": 3, "device": "cpu", "threads": 1},
        "output": {"dir": str(tmp_path / "unused")},
    }
    return json.dumps(config)  # JSON is YAML


def _push_margin(model_dir: Path, dataset) -> float:
    """The smallest gap, over the pushed prototypes, between the squared distance to the patch
    each was pushed onto (0: the prototype is that patch) and to the next-nearest patch of any
    picture of its class in ``dataset`` (unreadable pictures skipped)."""
    model = load_model(model_dir).eval()
    candidates: list[list[torch.Tensor]] = [[] for _ in range(model.num_prototypes)]
    with torch.no_grad():
        for index in range(len(dataset)):
            try:
                image, label = dataset[index]
            except Exception:  # noqa: BLE001 - the test's unreadable files
                continue
            d = model.distances(model.latent(image.unsqueeze(0)))[0].flatten(1)  # (M, H'*W')
            for j in torch.nonzero(model.prototype_classes == label).flatten().tolist():
                candidates[j].append(d[j])
    margins = []
    for j, found in enumerate(candidates):
        nearest = torch.cat(found).sort().values
        assert float(nearest[0]) < 1e-4, (j, float(nearest[0]))  # pushed: the prototype is a patch
        margins.append(float(nearest[1] - nearest[0]))
    return min(margins)


def _assert_same_run(single: Path, ddp: Path) -> None:
    # the files: rank 0 writes what a single process writes
    def listing(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if "cache" not in p.parts}

    assert listing(ddp) == listing(single)

    a, b = load_file(str(single / "model" / "model.safetensors")), load_file(str(ddp / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # Float noise only: the ranks sum in another order, and Adam turns a near-zero gradient
        # of either sign into a step of +-lr, so a few coordinates may differ by about lr.
        x, y = a[key].float(), b[key].float()
        assert float((x - y).abs().max()) <= 5e-4, (key, float((x - y).abs().max()))
        # and overall: 0.1 % of the tensor's size (plus an RMS floor of 1e-4 for tensors near 0)
        assert float((x - y).norm()) <= 1e-3 * float(x.norm()) + 1e-4 * x.numel() ** 0.5, (key, float((x - y).norm()), float(x.norm()))

    ma, mb = json.loads((single / "model" / "model.json").read_text()), json.loads((ddp / "model" / "model.json").read_text())
    prov_a = [(p["prototype"], p["dataset_index"], p["position"], p["path"]) for p in ma["provenance"]]
    prov_b = [(p["prototype"], p["dataset_index"], p["position"], p["path"]) for p in mb["provenance"]]
    assert prov_a == prov_b
    for p, q in zip(ma["provenance"], mb["provenance"]):
        assert math.isclose(p["distance"], q["distance"], rel_tol=1e-3, abs_tol=2e-3)
        assert p["box"] == q["box"]

    ra, rb = json.loads((single / "results.json").read_text()), json.loads((ddp / "results.json").read_text())
    assert ra["selected_step"] == rb["selected_step"]
    assert ra["bad_images"] == rb["bad_images"]
    for split in ("validation", "test"):
        assert ra[split]["n"] == rb[split]["n"]
        assert ra[split]["accuracy"] == rb[split]["accuracy"]
        assert ra[split]["per_class"] == rb[split]["per_class"]

    steps_a = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["epoch"]) for s in steps_a] == [(s["stage"], s["epoch"]) for s in steps_b]
    assert [s["stage"] for s in steps_a].count("push") == 2
    # losses, accuracies, push distances: equal up to the float noise Adam amplifies over the steps
    for sa, sb in zip(steps_a, steps_b):
        assert sa.keys() == sb.keys()
        assert sa["val_accuracy"] == sb["val_accuracy"]
        for key, value in sa.items():
            if isinstance(value, float) and key != "seconds":
                assert math.isclose(value, sb[key], rel_tol=1e-3, abs_tol=2e-3), (sa["step"], key, value, sb[key])


def test_torchrun_two_ranks_train_what_one_process_trains(tmp_path):
    """Synthetic data through the decoded-image cache; 17 training images in batches of 8 (the last
    global batch has one image: rank 1 gets an empty slice and must still join the all-reduce)."""
    single, ddp, writes = train_both(tmp_path, _config_text("synthetic", tmp_path, cache=True, cache_dir=None))
    assert writes == [], f"rank 1 wrote into the run directory: {writes[:5]}"
    assert (ddp / "cache").is_dir()  # rank 0 built it, rank 1 read it
    _assert_same_run(single, ddp)


def test_unreadable_images_on_one_rank_do_not_change_the_update(tmp_path):
    """An ImageFolder tree with unreadable files, batches of 2: when one rank's image is
    unreadable, the other rank's image is the whole batch (its loss weight doubles) and the first
    runs a zero-weight stand-in. Every rank learns of every bad file; rank 0 lists them all."""
    root = tmp_path / "images"
    source = ColourDataset(num_classes=3, per_class=7, image_size=32, seed=5)
    grain = np.random.default_rng(0)
    for split, picks in (("train", range(0, 21)), ("test", range(0, 21, 2))):
        for index in picks:
            folder = root / split / source.classes[source.targets[index]]
            folder.mkdir(parents=True, exist_ok=True)
            # Strong grain on the flat colour square keeps max pooling and push away from ties.
            # With exactly equal pixels (or a faint grain: +-6 was tried), neighbouring cells give
            # activations equal up to float rounding; which one max pooling routes the gradient
            # through, and which patch push picks, then follows the last bits of the arithmetic,
            # which differ between one process and two ranks (other batch sizes, other summation
            # order) and between CPUs (AVX-512/AMX vs AVX2 kernels): the runs part at the first
            # such choice. With +-40 every choice is decided by a margin far above rounding, and
            # the test checks that margin for push below.
            picture = np.asarray(source.load_image(index), dtype=np.int16) + grain.integers(-40, 41, size=(32, 32, 3))
            Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    for name in ("train/colour_0/bad.png", "train/colour_1/bad.png", "train/colour_2/bad.png", "test/colour_1/bad.png"):
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    text = _config_text(str(root), tmp_path, batch_size=2, val_fraction=0.15)
    single, ddp, writes = train_both(tmp_path, text)
    assert writes == [], f"rank 1 wrote into the run directory: {writes[:5]}"
    # The comparison below is only meaningful when push is not a near-tie: every prototype's
    # nearest patch must beat the runner-up by far more than the float noise between the runs
    # (their push distances agree to about 1e-5).
    assert _push_margin(single / "model", build_dataset(root, "train", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)) > 1e-3
    _assert_same_run(single, ddp)
    listed = (ddp / "bad_images.txt").read_text()
    assert listed == (single / "bad_images.txt").read_text()
    assert len(listed.splitlines()) == 4 and all(line.split("\t")[0].endswith("bad.png") for line in listed.splitlines())


def test_a_refusal_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 alone checks the run directory; when it refuses (a run is already there), every rank
    raises the same one-line error and torchrun ends at once instead of rank 1 waiting forever."""
    path = tmp_path / "config.yaml"
    path.write_text(_config_text("synthetic", tmp_path))
    out = tmp_path / "taken"
    (out / "checkpoints" / "step-00000").mkdir(parents=True)
    command = [*torchrun(), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "protopnet", "-q",
               "train", str(path), "--out", str(out)]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert done.stderr.count("already holds a run") >= 2, done.stderr[-3000:]  # both ranks say why
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing written


@pytest.mark.slow  # trains twice with views, cache and pruning (~15 s on 2 cores)
def test_two_ranks_with_fixed_views_feature_cache_patch_init_and_pruning(tmp_path):
    """The options that change what an epoch reads and what the prototype set is: fixed
    augmented views with the frozen-layer cache (the first block's outputs, kept for the joint
    epochs and read by the last-layer stage, each rank computing its share of the similarities;
    the warm-up's whole-backbone outputs made from them), prototypes started on patches, the
    moving average of the weights taken before each push, pruning after the final push,
    stability training (each view's noisy copy cached beside it, in the same pass) and the
    diversity cost (a term of the prototypes alone, outside the forward pass) — two ranks must
    still train what one process trains."""
    config = json.loads(_config_text("synthetic", tmp_path, augment=True, augment_views=2, feature_cache=True))
    config["model"]["prototype_init"] = "patches"
    config.setdefault("optim", {})["ema_decay"] = 0.9
    config["schedule"].update(frozen_backbone_blocks=1, prune=True, prune_k=3, prune_threshold=2)
    config.setdefault("loss", {}).update(stability=1.0, diversity=0.5)
    single, ddp, writes = train_both(tmp_path, json.dumps(config))
    assert writes == []
    _assert_same_run(single, ddp)
    metrics = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics][-3:] == ["push", "prune", "last_layer"]

