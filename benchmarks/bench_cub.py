#!/usr/bin/env python
"""A real-data result on a CPU: ProtoPNet vs. the same backbone with a plain linear head on
CUB-200-2011 bounding-box crops.

Both models start from the same ImageNet backbone (``$TORCH_HOME/hub/checkpoints``; ``--weights``
sets that up from a folder of torchvision checkpoints), see the same images in the same split with
the same online augmentation and the same decoded-picture cache, and follow the same schedule with
the same optimiser settings as far as they apply:

* **ProtoPNet** — ``protopnet.train.Trainer`` on the config, exactly what ``protopnet train CONFIG
  data.root=DATA`` runs: warm-up (add-on + prototypes), joint (unfrozen backbone blocks + add-on +
  prototypes), push, last layer.
* **Linear baseline** — global average pooling + ``Linear(C, K)`` on the same backbone. Warm epochs
  train the head alone (the warm add-on learning rate), joint epochs the unfrozen backbone blocks
  (backbone learning rate) and the head (add-on learning rate, same StepLR), and where ProtoPNet
  optimises its last layer the head gets the same number of passes at the last-layer learning rate
  on the fixed pooled features. Cross-entropy only. With ``optim.ema_decay`` its weights are
  averaged over the warm-up and joint steps as ProtoPNet's are, and it takes the average before
  the last-layer stage (where ProtoPNet takes it before push).

Prints a markdown table (model | top-1 | top-5 | wall time) and writes the same numbers, with the
settings, to a JSON file. Test accuracy is computed in float32 on each final model; the float32 vs
bfloat16 inference accuracy of both is reported too.

Then, for each ProtoPNet, what the accuracy does not show, on the same test pictures
(:func:`protopnet.interpretability.evaluate_interpretability`): part consistency and stability
(Huang et al., ICCV 2023, on CUB's 15 part locations), nearest-patch purity (k = 5, training
pictures), and the two reference points for consistency — a detector fixed at the best single
cell (the floor a prototype must beat to show it follows the bird rather than the crop's centre)
and a random peak in each picture (chance). ``--seeds 0 1 ...`` trains every model once per seed
(``run.seed``) and prints each seed's row, the mean and the standard deviation over seeds.

Full run (30 classes, 224 px, about 30 minutes on 2 CPU cores)::

    python benchmarks/bench_cub.py --data ../shared/data/CUB_200_2011 --threads 2

Smoke test (a minute)::

    python benchmarks/bench_cub.py --data ../shared/data/CUB_200_2011 --classes 3 --epochs 2 --image-size 112 --out runs/bench_cub_smoke

Two seeds, ProtoPNet only::

    python benchmarks/bench_cub.py --data ../shared/data/CUB_200_2011 --threads 2 --models protopnet --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "cub200_mobilenet_v2.yaml"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights"

logger = logging.getLogger("bench_cub")


# -- the baseline -------------------------------------------------------------------------------

class BaselineOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)


class LinearBaseline(nn.Module):
    """The backbone, global average pooling and one linear layer: (B, 3, S, S) -> logits (B, K)."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool) -> None:
        super().__init__()
        from protopnet.model.backbones import build_backbone

        built = build_backbone(backbone, pretrained=pretrained)
        self.features = built.module
        self.head = nn.Linear(built.out_channels, num_classes)
        self.mean, self.std, self.num_classes = built.mean, built.std, num_classes

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (B, C)

    def forward(self, x: torch.Tensor) -> BaselineOutput:
        return BaselineOutput(self.head(self.pooled(x).float()))


def _step_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1)  # the Trainer's per-step seeds


def train_baseline(config: Any, data: Any, progress: Any = None) -> tuple[LinearBaseline, list[dict[str, Any]]]:
    """Train the linear baseline on ``data`` (a RunData) following ``config``'s schedule."""
    from protopnet.runtime import autocast, memory_format, resolve_device
    from protopnet.train.feature_cache import FrozenFeatureCache, split_backbone
    from protopnet.train.loader import IndexedSubset, ShardedBatchSampler, make_loader
    from protopnet.runtime import open_bar
    from protopnet.train.stages import backbone_blocks, freeze_batchnorm, plan_schedule, take_averaged_weights

    cfg, o = config, config.optim
    device = resolve_device(cfg.run.device)
    fmt = memory_format(cfg.run.channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = LinearBaseline(cfg.model.backbone, len(data.class_names), cfg.model.pretrained)
    model.to(device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    features, head = list(model.features.parameters()), list(model.head.parameters())
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}  # the Trainer's Adam: one pass over all parameters
    optimizers = {
        "warm": torch.optim.Adam([{"params": head, "lr": o.warm_add_on_lr, "weight_decay": o.weight_decay}], **fused),
        "joint": torch.optim.Adam([{"params": features, "lr": o.backbone_lr, "weight_decay": o.weight_decay},
                                   {"params": head, "lr": o.add_on_lr, "weight_decay": o.weight_decay}], **fused),
        "last_layer": torch.optim.Adam([{"params": head, "lr": o.last_layer_lr}], **fused),
    }
    scheduler = torch.optim.lr_scheduler.StepLR(optimizers["joint"], step_size=cfg.schedule.joint_lr_step, gamma=cfg.schedule.joint_lr_gamma)
    frozen = {id(p) for block in backbone_blocks(model.features)[: cfg.schedule.frozen_backbone_blocks] for p in block.parameters()}

    def bar(description: str, total: int) -> Any:
        return open_bar(progress, description, total)

    plan = plan_schedule(cfg.schedule)
    caches: dict[str, FrozenFeatureCache | None] = {}
    frozen_blocks = cfg.schedule.frozen_backbone_blocks

    def build_cache(blocks: int | None) -> FrozenFeatureCache | None:
        with bar("baseline: caching the frozen layers", len(data.training_items)) as b:
            return FrozenFeatureCache.build(
                model, blocks, data.train, data.training_items, device=device, precision=cfg.run.precision,
                channels_last=cfg.run.channels_last, batch_size=cfg.data.test_batch_size,
                num_workers=cfg.data.num_workers, max_bytes=cfg.data.feature_cache_max_gb * 1e9, progress=b.update,
            )

    def cached_layers(step: Any) -> FrozenFeatureCache | None:
        """As Trainer._feature_cache_for: the frozen blocks cached once; the warm-up cache made from them."""
        if step.stage == "joint":
            caches.pop("warm", None)
            if frozen_blocks > 0 and "prefix" not in caches:
                caches["prefix"] = build_cache(frozen_blocks)
            return caches.get("prefix")
        if "warm" not in caches:
            if frozen_blocks > 0 and any(s.stage == "joint" for s in plan[step.index + 1:]):
                if "prefix" not in caches:
                    caches["prefix"] = build_cache(frozen_blocks)
            prefix = caches.get("prefix")
            caches["warm"] = build_cache(None) if prefix is None else prefix.extended(
                model, None, precision=cfg.run.precision, channels_last=cfg.run.channels_last,
                batch_size=cfg.data.test_batch_size, max_bytes=cfg.data.feature_cache_max_gb * 1e9)
        return caches["warm"]

    # optim.ema_decay, as the Trainer does: a moving average of the weights over the training
    # epochs, which the model takes before push (here: before the last-layer stage) and at the end
    average: AveragedModel | None = None

    def adopt_average() -> None:
        nonlocal average
        if average is not None:
            take_averaged_weights(model, average)
            average = None

    metrics = []
    for step in plan:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"step": step.index, "stage": step.stage, "epoch": step.epoch}
        if step.stage not in ("warm", "joint"):
            adopt_average()
        with torch.random.fork_rng(devices=[]):
            seed = _step_seed(cfg.run.seed, step.index)
            torch.manual_seed(seed)
            if step.stage in ("warm", "joint"):
                if o.ema_decay and average is None:
                    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema_decay))
                for p in features:
                    p.requires_grad_(step.stage == "joint" and id(p) not in frozen)
                for p in head:
                    p.requires_grad_(True)
                model.train()
                if cfg.schedule.freeze_backbone_batchnorm:  # as the Trainer does
                    freeze_batchnorm(model.features)
                # the frozen layers' outputs cached exactly as the Trainer does (data.feature_cache)
                cache = cached_layers(step) if cfg.data.feature_cache else None
                blocks = None if cache is None else cache.frozen_blocks
                generator = torch.Generator().manual_seed(seed)
                order = torch.randperm(len(data.training_items), generator=generator).tolist()  # as the Trainer orders them
                if cache is not None:
                    suffix = split_backbone(model.features, blocks)[1]
                    loader: Any = list(cache.batches(order, cfg.data.batch_size, 0, 1))

                    def forward(x: torch.Tensor, suffix: Any = suffix) -> torch.Tensor:
                        x = x if suffix is None else suffix(x)
                        return model.head(F.adaptive_avg_pool2d(x, 1).flatten(1).float())
                else:
                    loader = make_loader(IndexedSubset(data.train, data.training_items), cfg.data.batch_size, generator=generator,
                                         num_workers=cfg.data.num_workers, batch_sampler=ShardedBatchSampler(order, cfg.data.batch_size, 0, 1))

                    def forward(x: torch.Tensor) -> torch.Tensor:
                        return model(x).logits
                total = correct = 0
                loss_sum = 0.0
                with bar(f"baseline epoch {step.epoch + 1}/{cfg.schedule.epochs} {step.stage}", len(loader)) as b:
                    for batch in loader:
                        if batch.images is None:
                            b.update(1)
                            continue
                        images = batch.images.to(device).to(memory_format=fmt)
                        labels = batch.labels.to(device)
                        with autocast(device, cfg.run.precision):
                            logits = forward(images)
                        loss = F.cross_entropy(logits.float(), labels)
                        optimizers[step.stage].zero_grad(set_to_none=True)
                        loss.backward()
                        optimizers[step.stage].step()
                        if average is not None:
                            average.update_parameters(model)
                        total += len(labels)
                        correct += int((logits.argmax(1) == labels).sum())
                        loss_sum += float(loss.detach()) * len(labels)
                        b.update(1)
                record.update(loss=loss_sum / max(total, 1), train_accuracy=correct / max(total, 1))
                if step.stage == "joint":
                    scheduler.step()
            elif step.stage == "last_layer":
                for p in features:
                    p.requires_grad_(False)
                model.eval()
                pooled, labels = [], []
                with torch.no_grad():
                    fixed = bool(cfg.data.augment_views or cfg.data.offline_augmentation)  # as the Trainer does
                    dataset, items = (data.train, data.training_items) if fixed else (data.clean, data.train_indices)
                    prefix = caches.get("prefix") if fixed else None
                    if prefix is not None:  # as the Trainer does: the later blocks on the cached frozen ones
                        suffix = split_backbone(model.features, prefix.frozen_blocks)[1]
                        keep = torch.nonzero(prefix.ok).flatten()
                        for chunk in keep.split(cfg.data.push_batch_size):
                            with autocast(device, cfg.run.precision):
                                x = suffix(prefix.tensors[chunk].to(memory_format=fmt))
                                pooled.append(F.adaptive_avg_pool2d(x, 1).flatten(1).float())
                            labels.append(prefix.labels[chunk])
                    else:
                        for batch in make_loader(IndexedSubset(dataset, items, augment=False), cfg.data.push_batch_size):
                            if batch.images is None:
                                continue
                            with autocast(device, cfg.run.precision):
                                pooled.append(model.pooled(batch.images.to(device).to(memory_format=fmt)).float())
                            labels.append(batch.labels.to(device))
                x, y = torch.cat(pooled), torch.cat(labels)
                generator = torch.Generator().manual_seed(seed)
                with bar("baseline last layer", cfg.schedule.last_layer_iterations) as b:
                    for _ in range(cfg.schedule.last_layer_iterations):
                        correct = 0
                        for chunk in torch.randperm(len(y), generator=generator).split(cfg.data.batch_size):
                            logits = model.head(x[chunk])
                            loss = F.cross_entropy(logits, y[chunk])
                            optimizers["last_layer"].zero_grad(set_to_none=True)
                            loss.backward()
                            optimizers["last_layer"].step()
                            correct += int((logits.argmax(1) == y[chunk]).sum())
                        b.update(1)
                record.update(train_accuracy=correct / max(len(y), 1))
            elif step.stage not in ("push", "prune"):  # no counterpart without prototypes
                raise ValueError(f"the linear baseline has no counterpart of the {step.stage!r} stage; set it to 0 epochs")
        record["seconds"] = round(time.perf_counter() - t0, 3)
        metrics.append(record)
        logger.info("baseline %s", record)
    adopt_average()
    model.eval()
    return model, metrics


# -- the benchmark ----------------------------------------------------------------------------

def setup_torch_home(weights: Path | None, out: Path) -> str | None:
    """Make torchvision find the checkpoints in ``weights`` (offline): link them into
    ``$TORCH_HOME/hub/checkpoints``, creating ``out/torch_home`` when TORCH_HOME is unset."""
    if weights is None or not weights.is_dir():
        return os.environ.get("TORCH_HOME")
    files = sorted(weights.glob("*.pth"))
    home = Path(os.environ["TORCH_HOME"]) if os.environ.get("TORCH_HOME") else out / "torch_home"
    target = home / "hub" / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = target / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
    os.environ["TORCH_HOME"] = str(home)
    return str(home)


def evaluate(model: Any, dataset: Any, config: Any, precision: str) -> dict[str, Any]:
    from protopnet.train import accuracy_report, predict_logits

    logits, labels, _ = predict_logits(model, dataset, batch_size=config.data.test_batch_size, precision=precision,
                                       channels_last=config.run.channels_last and precision != "fp32", device="cpu")
    report = accuracy_report(logits, labels, list(dataset.classes))
    return {"n": report["n"], "top1": report["accuracy"], "top5": report["top5"]}


#: What bench_cub measures on each ProtoPNet besides accuracy (consistency brings its two reference points).
INTERPRETABILITY_METRICS = ("consistency", "stability", "purity", "duplicates")
#: The columns of the ProtoPNet table: (key of the per-seed row, header).
COLUMNS = (
    ("top1", "top-1"),
    ("consistency", "consistency"),
    ("consistency_fixed_cell", "fixed cell"),
    ("consistency_random_peak", "random peak"),
    ("stability", "stability"),
    ("purity", "purity"),
    ("duplicates", "duplicates"),
    ("consistency_distinct", "consistency (distinct)"),
    ("stability_distinct", "stability (distinct)"),
    ("seconds", "wall time"),
)


def measure_protopnet(model: Any, test: Any, train: Any, batch_size: int = 64) -> dict[str, Any]:
    """Consistency, stability, purity, duplicates (prototypes whose source patch another has,
    with consistency and stability over the distinct ones) and the two consistency reference points of ``model`` on
    ``test`` (purity's nearest patches come from ``train``), measured with a fixed seed (0) so
    that several training seeds are compared on the same noise and the same random peaks.

    Returns:
        ``{consistency, stability, purity, duplicates, consistency_distinct, stability_distinct,
        consistency_fixed_cell, consistency_random_peak}``
        (None where the data cannot support one: no part annotations, say), ``fixed_cell``
        (the chosen cell ``[row, col]`` of the activation grid), ``random_peak_standard_error``,
        ``skipped`` (metric -> why) and ``seconds``.
    """
    from protopnet.interpretability import evaluate_interpretability

    t0 = time.perf_counter()
    figures = evaluate_interpretability(model, test, train_dataset=train, metrics=INTERPRETABILITY_METRICS, batch_size=batch_size, device="cpu", seed=0)
    baselines = figures["details"].get("consistency_baselines") or {}
    return {
        **{key: figures[key] for key in ("consistency", "consistency_fixed_cell", "consistency_random_peak", "stability", "purity",
                                            "duplicates", "consistency_distinct", "stability_distinct")},
        "fixed_cell": (baselines.get("fixed_cell") or {}).get("cell"),
        "random_peak_standard_error": (baselines.get("random_peak") or {}).get("standard_error"),
        "skipped": figures["skipped"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min and max of the values that are
    not None, and how many there were."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(kept) / len(kept)
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else None
    return {"n": len(kept), "mean": mean, "sd": sd, "min": min(kept), "max": max(kept)}


def protopnet_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seed from the ``runs`` records (``{"seed", "results": {"protopnet": ...}}``):
    the :data:`COLUMNS` keys, top-1 in float32 and the training wall time in seconds."""
    rows = []
    for run in runs:
        r = run["results"].get("protopnet")
        if r is None:
            continue
        rows.append({"seed": run["seed"], "top1": r["test_fp32"]["top1"], **{k: r["interpretability"].get(k) for k, _ in COLUMNS[1:-1]},
                     "seconds": r["seconds"]})
    return rows


def protopnet_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown table of :func:`protopnet_rows`: one line per seed, then the mean and the
    standard deviation over seeds when there are several; figures in percent, "n/a" where not
    measured. Returns the table and the summary (column -> :func:`spread`)."""
    summary = {key: spread([row[key] for row in rows]) for key, _ in COLUMNS}

    def cell(key: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        if key == "duplicates":
            return f"{value:.1f}" if value != int(value) else f"{int(value)}"
        return minutes(value) if key == "seconds" else f"{100 * value:.1f} %"

    lines = ["| ProtoPNet | " + " | ".join(header for _, header in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| seed {row['seed']} | " + " | ".join(cell(key, row[key]) for key, _ in COLUMNS) + " |")
    if len(rows) > 1:
        lines.append("| mean | " + " | ".join(cell(key, summary[key]["mean"]) for key, _ in COLUMNS) + " |")
        lines.append("| sd | " + " | ".join(cell(key, summary[key]["sd"]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines), summary


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ProtoPNet vs. a linear head on the same backbone, CUB-200-2011 crops, on a CPU.",
        epilog="example:\n  python benchmarks/bench_cub.py --data ../shared/data/CUB_200_2011 --threads 2\n"
               "  python benchmarks/bench_cub.py --data ../shared/data/CUB_200_2011 --classes 3 --epochs 2 --image-size 112",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="a CUB-200-2011 directory (official layout, the 30-class slice, or 'protopnet data' output)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the ProtoPNet config (default: configs/cub200_mobilenet_v2.yaml)")
    parser.add_argument("--out", default="runs/bench_cub", help="run directories, cache and JSON go here (default runs/bench_cub)")
    parser.add_argument("--json", help="where to write the results (default: OUT/bench_cub.json)")
    parser.add_argument("--classes", type=int, help="only the first K classes (smoke tests)")
    parser.add_argument("--epochs", type=int, help="schedule.epochs (warm epochs capped at epochs - 1 so a joint epoch runs)")
    parser.add_argument("--image-size", type=int, help="data.image_size (smoke tests; the result is at 224)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the config's run.threads, else PyTorch's default)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="a folder of torchvision checkpoints linked into $TORCH_HOME (default ../shared/weights)")
    parser.add_argument("--models", default="protopnet,baseline", help="which to train: protopnet, baseline or both (default)")
    parser.add_argument("--seeds", nargs="+", metavar="SEED", help="train every model once per seed (run.seed); default: the config's seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.precision=fp32")
    args = parser.parse_args(argv)
    if args.seeds:  # "--seeds 0 1 key=value": the list stops at the first override
        overrides = [item for item in args.seeds if "=" in item]
        args.seeds, args.overrides = [item for item in args.seeds if "=" not in item], overrides + list(args.overrides)
        bad = [item for item in args.seeds if not item.lstrip("-").isdigit()]
        if bad or not args.seeds:
            parser.error(f"--seeds takes whole numbers, got {', '.join(map(repr, bad)) or 'none'}")
        args.seeds = [int(item) for item in args.seeds]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("PIL").setLevel(logging.WARNING)
    from protopnet.checkpoint import load_model
    from protopnet.cli.common import progress_factory
    from protopnet.config import load_config
    from protopnet.data import build_dataset
    from protopnet.train import Trainer, build_run_data
    from protopnet.train.run_data import backbone_normalisation
    from protopnet.runtime import resolve_device, resolve_precision

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"protopnet", "baseline"}:
        sys.exit(f"bench_cub: --models must name protopnet and/or baseline, got {args.models!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch_home = setup_torch_home(Path(args.weights) if args.weights else None, out)

    base = load_config(args.config)
    overrides = [f"data.root={Path(args.data).resolve()}", f"output.dir={out / 'protopnet'}", f"data.cache_dir={out / 'cache'}"]
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    if args.epochs:
        overrides += [f"schedule.epochs={args.epochs}", f"schedule.warm_epochs={min(base.schedule.warm_epochs, args.epochs - 1)}"]
    if args.threads:
        overrides.append(f"run.threads={args.threads}")
    overrides += args.overrides
    config = load_config(args.config, overrides)
    precision = resolve_precision(resolve_device(config.run.device), config.run.precision)
    if precision != config.run.precision:  # 'auto' (or bf16 on an old GPU): both models use what it resolves to
        overrides.append(f"run.precision={precision}")
        config = load_config(args.config, overrides)
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    progress = progress_factory(args.quiet)
    seeds = list(args.seeds) if args.seeds else [config.run.seed]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"bench_cub: --seeds repeats a seed: {seeds}")

    dataset_kw: dict[str, Any] = {}
    if args.classes:
        names = build_dataset(config.data.root, split="train", image_size=config.data.image_size, crop=config.data.crop).classes
        dataset_kw["classes"] = list(names[: args.classes])
    mean, std = backbone_normalisation(config)
    runs: list[dict[str, Any]] = []
    data_seconds = 0.0
    for seed in seeds:
        if args.seeds:
            config = load_config(args.config, overrides + [f"run.seed={seed}"])
        t0 = time.perf_counter()
        data = build_run_data(config, mean, std, **dataset_kw)  # the split and the augmentation follow run.seed
        data_seconds += time.perf_counter() - t0
        n_train, n_test = len(data.train_indices), len(data.test) if data.test is not None else 0
        n_items = len(data.training_items)  # what one epoch goes through: n_train x data.augment_views
        logger.info("seed %d: data ready: %d classes, %d training / %d test images", seed, len(data.class_names), n_train, n_test)

        results: dict[str, Any] = {}
        if "protopnet" in models:
            run_dir = out / "protopnet" if len(seeds) == 1 else out / f"protopnet-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run directory
            t0 = time.perf_counter()
            trained = Trainer(config, run_dir, progress_bars=progress, data=data).fit()
            seconds = time.perf_counter() - t0
            model = load_model(trained.model_dir, device="cpu")
            results["protopnet"] = {
                "label": f"ProtoPNet ({config.model.backbone}, {model.num_prototypes} prototypes)",
                "test_fp32": {"n": trained.test["n"], "top1": trained.test["accuracy"], "top5": trained.test["top5"]},
                "test_bf16": evaluate(model, data.test, config, "bf16"),
                "interpretability": measure_protopnet(model, data.test, data.clean, config.data.test_batch_size),
                "seconds": seconds,
                "steps": [{k: r[k] for k in ("stage", "epoch", "seconds") if k in r} for r in trained.metrics],
                "model_dir": str(trained.model_dir),
            }
        if "baseline" in models:
            t0 = time.perf_counter()
            baseline, steps = train_baseline(config, data, progress)
            fp32 = evaluate(baseline, data.test, config, "fp32")
            seconds = time.perf_counter() - t0
            results["baseline"] = {
                "label": f"Linear head ({config.model.backbone}, GAP + Linear)",
                "test_fp32": fp32,
                "test_bf16": evaluate(baseline, data.test, config, "bf16"),
                "seconds": seconds,
                "steps": steps,
            }
        runs.append({"seed": seed, "results": results})

    total = sum(r["seconds"] for run in runs for r in run["results"].values()) + data_seconds
    several = len(seeds) > 1

    def seed_note(run: dict[str, Any]) -> str:
        return f" (seed {run['seed']})" if several else ""
    lines = ["| model | top-1 | top-5 | wall time |", "|---|---:|---:|---:|"]
    for run in runs:
        for r in run["results"].values():
            label = f"{r['label']}, seed {run['seed']}" if several else r["label"]
            lines.append(f"| {label} | {100 * r['test_fp32']['top1']:.1f} % | {100 * r['test_fp32']['top5']:.1f} % | {minutes(r['seconds'])} |")
    targets: dict[str, Any] = {"total_seconds": round(total, 1), "total_within_40_min": total <= 2400}
    notes = [
        f"{len(data.class_names)} classes, {n_train} training / {n_test} test images ({n_items} training items per epoch), "
        f"{config.data.image_size} px bounding-box crops; "
        f"{torch.get_num_threads()} threads, precision {config.run.precision}{', channels_last' if config.run.channels_last else ''}; "
        f"decoding + cache: {minutes(data_seconds)}; total: {minutes(total)}" + (f" for seeds {', '.join(map(str, seeds))}." if several else "."),
        "Test accuracy in float32; in bfloat16: " + ", ".join(
            f"{k}{seed_note(run)} {100 * r['test_bf16']['top1']:.1f} %" for run in runs for k, r in run["results"].items()) + ".",
    ]
    top1 = {name: spread([run["results"][name]["test_fp32"]["top1"] for run in runs]) for name in models}
    if {"protopnet", "baseline"} <= set(models):
        gap = 100 * (top1["protopnet"]["mean"] - top1["baseline"]["mean"])
        targets.update(protopnet_top1_at_least_81=top1["protopnet"]["mean"] >= 0.81,
                       gap_points=round(gap, 2), within_3_points_of_baseline=gap >= -3.0)
        notes.append(f"ProtoPNet - baseline: {gap:+.1f} points" + (" (means over seeds)." if several else "."))
    parts = ["\n".join(lines + [""] + notes)]
    summary: dict[str, Any] = {}
    if "protopnet" in models:
        interpretability_table, summary = protopnet_table(protopnet_rows(runs))
        skipped = runs[0]["results"]["protopnet"]["interpretability"]["skipped"]
        parts.append(
            interpretability_table + "\n\nSame test pictures: consistency, stability (Huang et al., ICCV 2023) and nearest-patch purity "
            "(k = 5, training pictures); fixed cell = consistency of a detector always peaking at the best single cell (the floor to "
            "beat), random peak = at a random cell in each picture (chance). Wall time: training."
            + ("".join(f"\nNot measured: {name}: {reason}." for name, reason in skipped.items()))
        )
    table = "\n\n".join(parts)
    print(table)
    record = {
        "config": str(args.config), "overrides": overrides, "data": str(Path(args.data).resolve()), "seeds": seeds,
        "classes": len(data.class_names), "train_images": n_train, "train_items_per_epoch": n_items, "test_images": n_test,
        "image_size": config.data.image_size, "threads": torch.get_num_threads(), "precision": config.run.precision,
        "channels_last": config.run.channels_last, "data_seconds": round(data_seconds, 1),
        "results": runs[0]["results"],  # the first seed's, as single-seed records have them
        "runs": runs, "top1": top1, "protopnet_summary": summary,
        "targets": targets, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_home": torch_home, "table": table,
    }
    json_path = Path(args.json) if args.json else out / "bench_cub.json"
    json_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"\nresults: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
