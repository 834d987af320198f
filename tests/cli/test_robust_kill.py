"""Kill ``protopnet train`` with SIGKILL at many moments — from outside at an arbitrary time,
inside an epoch, inside push, halfway through writing a checkpoint, between the two renames that
replace the model directory — and resume each time: the run ends with exactly the weights of an
uninterrupted run, and after every kill each checkpoint and model directory on disk is whole.

Real processes: ``PROTOPNET_KILL_AT=POINT:N`` (protopnet.atomic_files.fault_point) makes the run
SIGKILL itself at a chosen point; one kill comes from this test, by polling the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_whole, leftovers

CONFIG = """\
model: {backbone: tiny_cnn, pretrained: false, prototypes_per_class: 2, prototype_dim: 8}
data: {root: synthetic, image_size: 32, augment: false, val_fraction: 0.0, batch_size: 8,
       test_batch_size: 32, push_batch_size: 8, synthetic_classes: 3, synthetic_train_per_class: 8,
       synthetic_test_per_class: 2}
schedule: {epochs: 3, warm_epochs: 1, push_start: 1, push_every: 1, last_layer_iterations: 2}
run: {seed: 5, device: cpu, threads: 1}
output: {keep_checkpoints: 2, save_prototype_images: true, background_checkpoints: false}
"""
# Checkpoints written before the next step starts: each kill below then falls at a known step. The
# background writes (the default) are killed in test_sigkill_during_background_checkpoints_...
# Plan: 0 warm, 1 joint, 2 push, 3 last_layer, 4 joint, 5 push, 6 last_layer (3 batches an epoch).
# With val_fraction 0 every push selects the model, so the model directory is replaced at step 6.
PLAN = ["warm", "joint", "push", "last_layer", "joint", "push", "last_layer"]
STEPS = len(PLAN)


def command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("protopnet")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "protopnet.cli"]
    return [*prefix, "-q", *args]


def environment(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROTOPNET_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kill_at:
        env["PROTOPNET_KILL_AT"] = kill_at
    return env


def train(config: Path, out: Path, *, resume: bool = False, kill_at: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    args = command("train", str(config), "--out", str(out), *(["--resume"] if resume else []))
    return subprocess.run(args, env=environment(kill_at), capture_output=True, text=True, timeout=timeout)


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def newest(out: Path) -> int:
    return int(checkpoints(out)[-1].name.split("-")[1]) if checkpoints(out) else -1


def finish(baseline: subprocess.Popen) -> None:
    """Wait for the uninterrupted run (killed after 4 minutes) and check that it succeeded."""
    if baseline.poll() is None:
        try:
            baseline.wait(timeout=240)
        except subprocess.TimeoutExpired:
            baseline.kill()
    assert baseline.returncode == 0, baseline.stderr.read()


def assert_same_run(full: Path, cut: Path) -> None:
    """The interrupted and resumed run ``cut`` ended as the uninterrupted ``full``: the same
    weights, the same selected step and test figures, the same steps."""
    a, b = load_file(full / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert ra["selected_step"] == rb["selected_step"] == STEPS - 1 and ra["test"] == rb["test"]
    stages = [[json.loads(line)["stage"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, cut)]
    assert stages[0] == stages[1] == PLAN


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    # The uninterrupted run, in parallel with the interrupted one.
    baseline = subprocess.Popen(command("train", str(config), "--out", str(tmp_path / "full")), env=environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "cut"
    try:
        # 1. From outside, as soon as the first checkpoint exists (somewhere inside step 1).
        victim = subprocess.Popen(command("train", str(config), "--out", str(out)), env=environment(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step-00000").is_dir() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert_whole(out)
        assert 0 <= newest(out) <= 3  # (so that every kill below still has its moment ahead)

        # 2. Inside an epoch: after the 2nd training batch of the resumed run.
        before = newest(out)
        run = train(config, out, resume=True, kill_at="batch:2")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert_whole(out)
        assert newest(out) >= before

        # 3. Inside push: after its first batch (the prototypes half-way between two states).
        run = train(config, out, resume=True, kill_at="push:1")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert_whole(out)
        push = newest(out) + 1
        assert PLAN[push] == "push"

        # 4. Halfway through writing the checkpoint of that push step: model.safetensors written,
        # the optimiser state and state.json not. The half checkpoint is a hidden temporary.
        run = train(config, out, resume=True, kill_at="checkpoint-write:1")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert_whole(out)
        assert newest(out) == push - 1
        half = [name for name in leftovers(out) if name.startswith(f".step-{push:05d}.") and name.endswith(".tmp")]
        assert len(half) == 1, leftovers(out)
        assert (out / "checkpoints" / half[0] / "model.safetensors").is_file()
        assert not (out / "checkpoints" / half[0] / "state.json").exists()

        # 5. Between the two renames that replace the model directory (at step 6, the last
        # selection): the new version is not in place yet, the old one only under a hidden name.
        run = train(config, out, resume=True, kill_at="directory-swap:1")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert half[0] not in leftovers(out)  # cleaned up by the resume
        assert not (out / "model").exists()
        assert [name for name in leftovers(out) if name.startswith(".model.old-")], leftovers(out)
        assert [p.name for p in checkpoints(out)] == ["step-00004", "step-00005"]
        assert_whole(out)

        # 6. A truncated newest checkpoint is detected and the one before used; the last resume
        # finishes, with the old model directory restored meanwhile and nothing hidden left.
        blob = out / "checkpoints" / "step-00005" / "model.safetensors"
        blob.write_bytes(blob.read_bytes()[:1000])
        run = train(config, out, resume=True)
        assert run.returncode == 0, run.stderr
        assert "step-00005 is unusable" in run.stderr and "checksum mismatch" in run.stderr
        assert leftovers(out) == []
        assert_whole(out)
    finally:
        finish(baseline)
    assert_same_run(tmp_path / "full", out)
    shutil.rmtree(tmp_path / "full")


@pytest.mark.slow
def test_sigkill_during_background_checkpoints_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """``output.background_checkpoints`` (the default): a checkpoint is written while the next
    step trains. Killed halfway through that write, the run keeps the checkpoint before it
    whole, leaves the half one hidden, and resumes — killed again inside an epoch, then to the
    end — to the uninterrupted run's weights."""
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.replace("background_checkpoints: false", "background_checkpoints: true"))
    baseline = subprocess.Popen(command("train", str(config), "--out", str(tmp_path / "full")), env=environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "cut"
    try:
        # 1. Halfway through the 2nd checkpoint (step 1's, written while step 2 runs).
        run = train(config, out, kill_at="checkpoint-write:2")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert_whole(out)
        assert newest(out) == 0
        half = [name for name in leftovers(out) if name.startswith(".step-00001.") and name.endswith(".tmp")]
        assert len(half) == 1 and (out / "checkpoints" / half[0] / "model.safetensors").is_file(), leftovers(out)

        # 2. Inside an epoch of the resumed run, then 3. to the end.
        run = train(config, out, resume=True, kill_at="batch:4")
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert_whole(out)
        assert half[0] not in leftovers(out)  # cleaned up by the resume
        run = train(config, out, resume=True)
        assert run.returncode == 0, run.stderr
        assert leftovers(out) == []
        assert_whole(out)
    finally:
        finish(baseline)
    assert_same_run(tmp_path / "full", out)


def test_cleanup_removes_only_what_killed_writes_leave_and_restores_a_swapped_directory(tmp_path):
    from protopnet.atomic_files import clean_interrupted_writes

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00002").mkdir(parents=True)
    (run / "checkpoints" / ".step-00003.k2j4_x9a.tmp").mkdir()  # a checkpoint being written
    (run / "checkpoints" / ".step-00003.k2j4_x9a.tmp" / "model.safetensors").write_bytes(b"half")
    (run / "checkpoints" / ".step-00000.del-12-345").mkdir()  # an old checkpoint being deleted
    (run / ".model.abcdefgh.tmp").mkdir()  # the new model, being written
    (run / ".model.old-12-999").mkdir()  # the old model, renamed away: model/ is missing
    (run / ".model.old-12-999" / "model.json").write_text("{}")
    (run / ".metrics.jsonl.zz99_abc.tmp").write_text("partial")
    for keep in (".hidden", "notes.tmp", ".notes.tmp", ".model.old", "step-00001.tmp"):  # not ours: kept
        (run / keep).write_text("user file")
    clean_interrupted_writes(run / "checkpoints")
    clean_interrupted_writes(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00002"]
    assert sorted(p.name for p in run.iterdir()) == [".hidden", ".model.old", ".notes.tmp", "checkpoints", "model", "notes.tmp", "step-00001.tmp"]
    assert (run / "model" / "model.json").read_text() == "{}"  # the old version is back in place
    (run / ".model.old-13-1").mkdir()  # with model/ present, a leftover old version just goes
    assert clean_interrupted_writes(run) == [".model.old-13-1"] and (run / "model" / "model.json").exists()
