"""The demo's figures over seeds and CPU kernel settings: what `protopnet demo` gives on another
machine, not one lucky run.

    python benchmarks/bench_demo.py [--seeds 0 1 2] [--kernels default avx2] [--threads 2]
        [--out DIR] [key=value ...]

Runs ``protopnet demo`` once per (seed, kernel setting), each in its own process (oneDNN and MKL
read their instruction-set caps when they load, so the setting must be in the environment before
the process starts):

* ``default``: the kernels this CPU picks (AVX-512, AMX, ... where it has them);
* ``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, the kernels an AVX2 CPU
  (most laptops, older servers) runs.

Prints one row per run (test accuracy, prototype localisation after and before pruning, the
prototypes pruning kept, wall time) and, per kernel setting and over everything, the mean and the
range. Extra ``key=value`` arguments are config overrides passed to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = {
    "default": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
FIGURES = ("test_accuracy", "localization", "localization_before_pruning", "prototypes", "seconds")


def run_one(seed: int, kernel: str, threads: int, out: Path, overrides: list[str]) -> dict:
    """One demo in a fresh process; returns its ``demo.json``."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(KERNELS[kernel], OMP_NUM_THREADS=str(threads))
    target = out / f"seed{seed}-{kernel}"
    command = [sys.executable, "-m", "protopnet", "-q", "demo", "--out", str(target),
               f"run.seed={seed}", f"run.threads={threads}", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}, kernels {kernel}: the demo failed:\n{done.stderr[-2000:]}")
    return json.loads((target / "demo.json").read_text())


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["default", "avx2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        print("| seed | kernels | test accuracy | localisation (pruned) | localisation (before pruning) | prototypes kept | seconds |")
        print("|---:|---|---:|---:|---:|---:|---:|", flush=True)
        for kernel in args.kernels:
            for seed in args.seeds:
                figures = run_one(seed, kernel, args.threads, out, args.overrides)
                rows.append({"seed": seed, "kernel": kernel, **{k: figures[k] for k in FIGURES}})
                print(f"| {seed} | {kernel} | {figures['test_accuracy']:.3f} | {figures['localization']:.3f} | "
                      f"{figures['localization_before_pruning']:.3f} | {figures['prototypes']} | {figures['seconds']:.0f} |", flush=True)
        print()
        print("| kernels | runs | test accuracy | localisation (pruned) | localisation (before pruning) | prototypes kept |")
        print("|---|---:|---|---|---|---|")
        for kernel in [*args.kernels, "all"]:
            group = [r for r in rows if kernel in ("all", r["kernel"])]
            print(f"| {kernel} | {len(group)} | " + " | ".join(summary(group, k) for k in FIGURES[:-1]) + " |")
        print("\n(mean [min, max])")


if __name__ == "__main__":
    main()
