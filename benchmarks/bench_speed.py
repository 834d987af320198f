"""Training speed: every stage of a ProtoPNet run, timed against its floor — the backbone's own cost.

    python benchmarks/bench_speed.py [--backbones resnet18,vgg16,mobilenet_v2] [--sizes 112,224]
        [--precision fp32[,bf16|,auto]] [--channels-last] [--compile] [--ddp] [--threads 2]
        [--repeats 2] [--cache] [--json results.json] [--quick]

One fixed workload: 10 classes, 30 training and 10 test images per class (photo-like random
JPEGs of 500 x 375 on disk, decoded every epoch unless ``--cache``), 10 prototypes per class of
128 channels (1 x 1), batch size 16 for every stage, no augmentation, ``--threads`` threads in all
(with ``--ddp``, 2 processes of threads / 2 each). Weights are random (speed does not depend on
them). For each backbone, size, precision and mode (single process; 2-process DDP on gloo or
NCCL with ``--ddp``), a fresh process measures, after an untimed warm-up:

(``--precision auto`` is the best arithmetic the machine has: bf16 where it computes bfloat16
natively, as ``run.precision: auto`` picks; it is dropped when that is fp32 and fp32 is already
listed. ``--compile`` also measures every precision with ``run.compile: true``: the stages then
run through ``torch.compile``, their floors stay the eager backbone, and the untimed warm-up pays
for compiling.)

* ``backbone forward``: the backbone alone (eval mode, no grad) over the training images, and over
  the test images — the floor of push, the last-layer stage and evaluation;
* ``backbone fwd+bwd``: the backbone alone, forward and backward (train mode; no optimiser step)
  over the training images — the floor of a joint epoch;
* ``warm-up epoch``, ``joint epoch`` (``Trainer._train_epoch``), ``evaluation`` (test images),
  ``push``, ``push with pictures`` (push, then its prototypes' pictures drawn and written as a saved
  model writes them) and ``last layer (20 it.)`` (one pass to collect similarity
  vectors, then 20 iterations), each also as a ratio to its floor (goals: joint <= 1.10 x
  fwd+bwd, push with pictures <= 1.25 x forward);
* ``whole schedule``: ``Trainer.fit`` on 1 warm-up + 2 joint epochs, push, 20 last-layer
  iterations, checkpoints and the final test evaluation; its floor is the sum of its stages'
  floors (images/s: training images x epochs / s).

The backbone floors go through the same data pipeline (the same pictures — the training ones
decoded once and kept in memory, as a run keeps them, the test ones decoded on every pass — batch
sizes and, with DDP, the same sharding), so a ratio is what the ProtoPNet machinery adds. Timings
are medians of ``--repeats`` interleaved runs (the whole schedule: ``--repeats`` runs after the
stages); peak memory is the stage's peak resident set (VmHWM, reset
before each stage; summed over the DDP processes) or, on a GPU, ``torch.cuda.max_memory_allocated``.
On a GPU the card's name heads the table. ``--quick`` shrinks everything for a smoke test
(3 classes, 4 + 2 images per class, 64 px, 1 repeat, 2 last-layer iterations).

The full tables (takes a while on a CPU; run on a quiet machine)::

    python benchmarks/bench_speed.py --ddp --json speed-fp32.json
    python benchmarks/bench_speed.py --ddp --precision bf16 --channels-last --json speed-bf16.json
    python benchmarks/bench_speed.py --backbones resnet18 --sizes 224 --precision fp32,auto --channels-last --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

STAGES = ("backbone forward", "backbone forward (test)", "backbone fwd+bwd", "warm-up epoch", "joint epoch",
          "evaluation", "push", "push with pictures", "last layer", "whole schedule")
FLOORS = {  # stage -> (floor stage, goal ratio or None)
    "warm-up epoch": ("backbone forward", None),
    "joint epoch": ("backbone fwd+bwd", 1.10),
    "evaluation": ("backbone forward (test)", None),
    "push": ("backbone forward", None),
    "push with pictures": ("backbone forward", 1.25),
    "last layer": ("backbone forward", None),
    "whole schedule": ("schedule floor", None),
}


# -- the workload -----------------------------------------------------------------------------

def write_jpegs(root: Path, classes: int, train: int, test: int, width: int = 500, height: int = 375) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain, quality 90) under root/{train,test}/class_k/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for k in range(classes):
            folder = root / split / f"class_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                low = rng.integers(0, 255, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
                smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
                grain = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
                Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)


def run_config(spec: dict[str, Any], out: Path, epochs: int = 1, warm: int = 1, push_at_end: bool = False) -> Any:
    from protopnet.config import Config

    return Config.from_dict(
        {
            "model": {"backbone": spec["backbone"], "pretrained": False, "prototypes_per_class": 10, "prototype_dim": 128},
            "data": {"root": spec["root"], "image_size": spec["size"], "augment": False, "val_fraction": 0.0,
                     "batch_size": 16, "test_batch_size": 16, "push_batch_size": 16, "num_workers": 0,
                     "cache": spec["cache"], "cache_dir": str(Path(spec["root"]) / ".cache")},
            "schedule": {"epochs": epochs, "warm_epochs": warm, "push_start": epochs, "push_every": 1, "push_at_end": push_at_end,
                         "last_layer_iterations": spec["last_layer_iterations"]},
            "run": {"seed": 0, "device": spec["device"], "precision": spec["precision"], "channels_last": spec["channels_last"],
                    "compile": spec.get("compile", False)},
            "output": {"dir": str(out), "keep_checkpoints": 1, "save_prototype_images": False},
        }
    )


# -- measuring (inside one worker process, or each torchrun rank) -------------------------------

def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync(device: torch.device) -> None:
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak: an upper bound


CLOCK = time.perf_counter


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float]:
    _sync(device)
    _reset_peak(device)
    t0 = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - t0, _peak_mib(device)


def _batches(trainer: Any, dataset: Any, indices: list[int], shuffle_seed: int | None) -> Any:
    """The batches a stage would see on this rank: evaluation-style sharding (DistributedSampler)
    without ``shuffle_seed``, the trainer's global-order split with it."""
    from protopnet.train.loader import IndexedSubset, ShardedBatchSampler, make_loader

    rank, world = _world()
    subset = IndexedSubset(dataset, indices, augment=False)
    if shuffle_seed is None:
        return make_loader(subset, 16, sampler=trainer._sampler(indices, False, 0), pin_memory=trainer.device.type == "cuda")
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    return make_loader(subset, 16, batch_sampler=ShardedBatchSampler(order, 16, rank, world), pin_memory=trainer.device.type == "cuda")


def backbone_forward(trainer: Any, backbone: torch.nn.Module, dataset: Any, indices: list[int]) -> None:
    from protopnet.runtime import autocast, memory_format

    fmt = memory_format(trainer.config.run.channels_last)
    backbone.eval()
    with torch.no_grad():
        for batch in _batches(trainer, dataset, indices, None):
            with autocast(trainer.device, trainer.precision):
                backbone(batch.images.to(trainer.device, non_blocking=True).to(memory_format=fmt))


def backbone_forward_backward(trainer: Any, backbone: torch.nn.Module, indices: list[int]) -> None:
    from protopnet.runtime import autocast, memory_format

    fmt = memory_format(trainer.config.run.channels_last)
    backbone.train()
    for batch in _batches(trainer, trainer.data.train, indices, 1):
        with autocast(trainer.device, trainer.precision):
            features = backbone(batch.images.to(trainer.device, non_blocking=True).to(memory_format=fmt))
        features.float().mean().backward()
        for p in backbone.parameters():
            p.grad = None


def write_pictures(trainer: Any, directory: Path) -> None:
    """The prototypes' pictures after a push, drawn and written as a saved model writes them
    (``prototypes/<j>_<kind>.png``), without the weights."""
    from protopnet.checkpoint import _write_prototype_pictures, model_metadata
    from protopnet.visualize import draw_prototype_pictures

    provenance = model_metadata(trainer.model)["provenance"]
    shutil.rmtree(directory, ignore_errors=True)
    _write_prototype_pictures(provenance, draw_prototype_pictures(provenance, trainer.data.clean), directory)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Every stage's (seconds, peak MiB) on this process (rank 0's figures are reported)."""
    from protopnet.train import Trainer
    from protopnet.train.evaluate import predict_logits
    from protopnet.train.stages import Step

    rank, world = _world()
    work = Path(spec["work"]) / f"{spec['backbone']}-{spec['size']}-{spec['precision']}-{int(spec.get('compile', False))}-{world}"
    trainer = Trainer(run_config(spec, work / "stages"), work / "stages")
    device = trainer.device
    train_idx = trainer.data.train_indices
    test, test_idx = trainer.data.test, list(range(len(trainer.data.test)))
    backbone = copy.deepcopy(trainer.model.features)  # the floors' own copy (DDP hooks stay off the model)
    if world > 1:
        backbone = torch.nn.parallel.DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None)
    iterations = spec["last_layer_iterations"]
    stages: dict[str, Callable[[], Any]] = {
        "backbone forward": lambda: backbone_forward(trainer, backbone, trainer.data.clean, train_idx),
        "backbone forward (test)": lambda: backbone_forward(trainer, backbone, test, test_idx),
        "backbone fwd+bwd": lambda: backbone_forward_backward(trainer, backbone, train_idx),
        "warm-up epoch": lambda: trainer._train_epoch(Step(0, "warm", 0)),
        "joint epoch": lambda: trainer._train_epoch(Step(1, "joint", 1)),
        "evaluation": lambda: predict_logits(trainer.model, test, batch_size=16, device=device, precision=trainer.precision,
                                             channels_last=trainer.config.run.channels_last,
                                             sampler=trainer._sampler(test_idx, False, 0)),
        "push": lambda: trainer._push(Step(2, "push", 1)),
        "push with pictures": lambda: (trainer._push(Step(2, "push", 1)), rank == 0 and write_pictures(trainer, work / "pictures")),
        "last layer": lambda: trainer._last_layer(Step(3, "last_layer", 1)),
    }
    for fn in stages.values():  # warm-up: files in the page cache, kernels picked, memory allocated
        fn()
    times: dict[str, list[float]] = {name: [] for name in stages}
    peaks: dict[str, float] = {}
    for _ in range(spec["repeats"]):
        for name, fn in stages.items():  # interleaved: a shared machine's load hits stage and floor alike
            seconds, peak = _timed(device, fn)
            times[name].append(seconds)
            peaks[name] = max(peaks.get(name, 0.0), peak)

    def schedule(out: Path) -> None:
        Trainer(run_config(spec, out, epochs=3, warm=1, push_at_end=True), out).fit()

    # the whole schedule as often as the stages (a shared machine's load moves one run by up to 15 %)
    times["whole schedule"] = []
    for repeat in range(spec["repeats"]):
        seconds, peak = _timed(device, lambda: schedule(work / f"schedule-{repeat}"))
        times["whole schedule"].append(seconds)
        peaks["whole schedule"] = max(peaks.get("whole schedule", 0.0), peak)
    result = {
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "peak_mib": peaks,
        "images": {"train": len(train_idx), "test": len(test_idx)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    }
    if world > 1:  # peak memory: all processes together
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, peaks)
        result["peak_mib"] = {k: sum(g[k] for g in gathered) for k in peaks}
    return result


def worker(spec_path: str) -> None:
    global CLOCK
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if spec.get("cpu_time"):
        CLOCK = time.process_time
    import torch.distributed as dist

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if spec["device"].startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            spec["device"] = f"cuda:{local}"
        dist.init_process_group("nccl" if spec["device"].startswith("cuda") else "gloo")
    try:
        result = measure(spec)
        if _world()[0] == 0:
            Path(spec["result"]).write_text(json.dumps(result))
    finally:
        if distributed:
            dist.destroy_process_group()


# -- orchestration ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict[str, Any], processes: int, tmp: Path) -> dict[str, Any] | None:
    tag = f"{spec['backbone']}-{spec['size']}-{spec['precision']}{'-compile' if spec.get('compile') else ''}-{processes}"
    spec = dict(spec, result=str(tmp / f"{tag}.json"), threads=max(1, spec["threads"] // processes))
    spec_path = tmp / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    script = str(Path(__file__).resolve())
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if spec.get("cpu_time"):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep instead of spinning (spinning is CPU time)
    if processes == 1:
        command = [sys.executable, script, "--worker", str(spec_path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", script, "--worker", str(spec_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"<!-- {tag} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode} -->", file=sys.stderr)
        sys.stderr.write(done.stderr[-4000:])
        return None
    return json.loads(Path(spec["result"]).read_text())


def table(rows: list[tuple[dict[str, Any], str, dict[str, Any]]], epochs_in_schedule: int = 3) -> str:
    lines = ["| backbone | px | precision | processes | stage | s | images/s | x floor | goal | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, mode, result in rows:
        s, peaks, images = result["seconds"], result["peak_mib"], result["images"]
        # the schedule's floor: its epochs' and stages' floors, plus the final test evaluation
        s = dict(s, **{"schedule floor": s["backbone forward"] * 1 + s["backbone fwd+bwd"] * (epochs_in_schedule - 1)
                       + s["backbone forward"] * 2 + s["backbone forward (test)"]})
        for stage in STAGES:
            count = images["test"] if "test" in stage or stage == "evaluation" else images["train"]
            if stage == "whole schedule":
                count = images["train"] * epochs_in_schedule
            ratio, goal = "", ""
            if stage in FLOORS:
                floor, target = FLOORS[stage]
                value = s[stage] / s[floor]
                ratio = f"{value:.2f}"
                if target is not None:
                    goal = f"<= {target:.2f} {'met' if value <= target else 'missed'}"
            arithmetic = f"{spec['precision']}{' CL' if spec['channels_last'] else ''}{' compiled' if spec.get('compile') else ''}"
            lines.append(f"| {spec['backbone']} | {spec['size']} | {arithmetic} | {mode} | "
                         f"{stage} | {s[stage]:.2f} | {count / s[stage]:.1f} | {ratio} | {goal} | {peaks[stage]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,vgg16,mobilenet_v2")
    parser.add_argument("--sizes", default="112,224")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (GPU), auto (the best "
                        "this machine computes natively)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure each precision with run.compile (torch.compile)")
    parser.add_argument("--ddp", action="store_true", help="also run 2-process DistributedDataParallel")
    parser.add_argument("--threads", type=int, default=2, help="threads in all (split among DDP processes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="data.cache: decode the JPEGs once")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-time", action="store_true", help="time with each process's CPU time instead of wall time "
                        "(steadier on a busy shared machine; GPU runs need wall time)")
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny workload, 64 px unless --sizes, 1 repeat")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    from protopnet.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precisions: list[str] = []
    for name in args.precision.split(","):
        resolved = resolve_precision(device, name.strip())
        if resolved not in precisions:
            precisions.append(resolved)
    classes, train, test, iterations = (3, 4, 2, 2) if args.quick else (10, 30, 10, 20)
    sizes = [int(s) for s in args.sizes.split(",")] if (args.sizes != parser.get_default("sizes") or not args.quick) else [64]
    repeats = 1 if args.quick else args.repeats
    modes = [1, 2] if args.ddp else [1]
    if device.type == "cuda" and args.ddp and torch.cuda.device_count() < 2:
        print("<!-- one GPU: DDP rows need 2 GPUs, skipped -->", file=sys.stderr)
        modes = [1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "images"
        write_jpegs(root, classes, train, test)
        for backbone in args.backbones.split(","):
            for size in sizes:
                for precision in precisions:
                    for compiled in ([False, True] if args.compile else [False]):
                        for processes in modes:
                            spec = {"backbone": backbone, "size": size, "precision": precision, "channels_last": args.channels_last,
                                    "compile": compiled, "root": str(root), "cache": args.cache, "device": str(device),
                                    "threads": args.threads, "repeats": repeats, "last_layer_iterations": iterations,
                                    "work": str(tmp / "work"), "cpu_time": args.cpu_time}
                            t0 = time.perf_counter()
                            result = launch(spec, processes, tmp)
                            print(f"<!-- {backbone} {size} px {precision}{' compiled' if compiled else ''} x{processes}: "
                                  f"{time.perf_counter() - t0:.0f} s -->", file=sys.stderr)
                            if result is not None:
                                rows.append((spec, "DDP x2" if processes > 1 else "1", result))
    devices = sorted({r["device"] for _, _, r in rows})
    print(f"# ProtoPNet stage speed — {', '.join(devices)}; {classes} classes x ({train} train + {test} test) JPEGs, "
          f"10 prototypes/class x 128 ch, batch 16, {args.threads} threads in all, median of {repeats}"
          f"{', CPU time (s: CPU seconds)' if args.cpu_time else ''}"
          f"{', decoded-image cache' if args.cache else ''}\n")
    print(table(rows))
    print(f"\nx floor: the stage's time over the backbone's own cost on the same images at the same precision "
          f"(forward for evaluation, push, warm-up and last layer; forward + backward for a joint epoch; the whole "
          f"schedule over the sum of its stages' floors). Last layer: {iterations} iterations. CL: channels_last. "
          f"compiled: run.compile (torch.compile) for the stages; their floors stay the eager backbone.")
    if args.json:
        Path(args.json).write_text(json.dumps([{"spec": {k: v for k, v in spec.items() if k not in ("root", "work")}, "mode": mode, **result}
                                               for spec, mode, result in rows], indent=1))


if __name__ == "__main__":
    main()
