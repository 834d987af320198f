r"""protopnet train CONFIG.yaml [--out DIR] [--resume] [key=value ...]

Several processes (DistributedDataParallel)
-------------------------------------------
``torchrun`` starts one process per GPU (or per CPU socket) and each joins the process group
(NCCL on GPUs, gloo on CPUs)::

    # one machine, N processes
    torchrun --nproc_per_node=N -m protopnet train CONFIG.yaml --out runs/x

    # several machines: the same command on each (HOST: one of them, reachable by all)
    torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=cub-run \
        -m protopnet train CONFIG.yaml --out /shared/runs/x

(``--standalone`` instead of the rendezvous options on one machine picks a free port.)

What a single process would do is done, only split: every epoch has one seeded global batch
order and each global batch of ``data.batch_size`` images is divided among the ranks (the loss of
each rank weighted by its share, so the averaged gradient is the single-process gradient);
validation, test evaluation, push and the last-layer stage's similarity vectors are sharded and
gathered; push keeps the globally nearest patch (ties: the smaller dataset index). With a
batch-independent backbone (no BatchNorm, e.g. ``tiny_cnn_gn``) and without online augmentation
(``data.augment``: its random draws depend on which process loads an image) the result equals the
single-process run's up to float rounding; with BatchNorm each rank normalises with its own
slice's statistics, as DistributedDataParallel usually does. Only rank 0 writes (checkpoints,
model, metrics, results, the decoded-image cache, which it builds before the others read it);
every rank reads the checkpoint on ``--resume`` and the cache, so on several machines ``--out``
(and ``data.cache_dir``) must be on a filesystem they share. ``data.batch_size`` stays the global
batch size: on N GPUs each processes about batch_size / N images per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import logging
import sys
from typing import Any, Iterator

from .common import CommandError, add_parser, progress_factory

logger = logging.getLogger(__name__)


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "train",
        "Train a ProtoPNet: warm-up, joint, push and last-layer stages as the config schedules them.",
        "protopnet train configs/demo.yaml --out runs/demo schedule.epochs=4",
    )
    parser.add_argument("config", help="a YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. schedule.epochs=3 data.root=/data/CUB_200_2011")
    parser.add_argument("--out", help="run directory (default: output.dir of the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..train import train

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    if args.out:
        config.output.dir = args.out
    apply_threads(config.run.threads)
    with distributed_from_environment(config) as rank:
        try:
            result = train(config, config.output.dir, resume=args.resume, progress_bars=progress_factory(args.quiet or rank > 0))
        except FileExistsError as error:
            raise CommandError(str(error)) from None
    if rank > 0:
        return 0
    summary = {
        "model": str(result.model_dir),
        "validation_accuracy": result.validation.get("accuracy"),
        "test_accuracy": result.test["accuracy"] if result.test else None,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary), file=sys.stdout)
    return 0


@contextlib.contextmanager
def distributed_from_environment(config: Any) -> Iterator[int]:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); yields this rank.

    NCCL when the config's device is CUDA, gloo otherwise. Each rank uses the GPU of its
    LOCAL_RANK. Without torchrun's variables this is a no-op yielding 0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0
        return
    import torch
    import torch.distributed as dist

    from ..runtime import resolve_device

    device = resolve_device(config.run.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        config.run.device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
        # Every rank done before any closes its connections: a gloo rank whose peer tears the
        # group down while it is still finishing can abort at exit ("terminate called without an
        # active exception"), failing a run that trained correctly.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def apply_threads(threads: int) -> None:
    """The CLI owns the process: set PyTorch's thread count when the config asks."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
