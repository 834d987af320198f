"""A full disk or a read-only output directory: found before any training work when it is so from
the start; mid-run, the failed write ends ``protopnet train`` with one line naming the intact
checkpoint, and ``--resume`` (once there is room) finishes with the uninterrupted run's weights.

Real conditions where the machine allows it (a size-limited tmpfs filled up, a tmpfs remounted
read-only: needs root with CAP_SYS_ADMIN, else skipped); a monkeypatched ENOSPC/EROFS elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protopnet.cli import main

from conftest import assert_whole, leftovers

loop = importlib.import_module("protopnet.train.loop")
state = importlib.import_module("protopnet.train.state")  # the checkpoint writer

CONFIG = """\
model: {backbone: tiny_cnn, pretrained: false, prototypes_per_class: 2, prototype_dim: 8}
data: {root: synthetic, image_size: 32, augment: false, val_fraction: 0.0, batch_size: 8,
       test_batch_size: 32, push_batch_size: 8, synthetic_classes: 3, synthetic_train_per_class: 6,
       synthetic_test_per_class: 2}
schedule: {epochs: 2, warm_epochs: 1, push_start: 1, push_every: 1, last_layer_iterations: 2}
run: {seed: 2, device: cpu}
output: {keep_checkpoints: 2, save_prototype_images: false}
"""
# Plan: 0 warm, 1 joint, 2 push, 3 last_layer.
AFTER_STEP = loop.Trainer._after_step


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("disk") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def uninterrupted(config):
    out = config.parent / "full"
    assert main(["-q", "train", str(config), "--out", str(out)]) == 0
    return load_file(out / "model" / "model.safetensors")


def same_weights(a: dict, out: Path) -> None:
    b = load_file(out / "model" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def fail_writes_after(monkeypatch, after_step: int, action) -> None:
    """Run ``action()`` once, right after step ``after_step`` was checkpointed (its checkpoint,
    written in the background, waited for: the action must not land on it)."""
    def after(self, step, val):
        AFTER_STEP(self, step, val)
        if step.index == after_step:
            self._complete_checkpoint_write()
            action()

    monkeypatch.setattr(loop.Trainer, "_after_step", after)


# -- simulated: always runs -----------------------------------------------------------------------

def test_enospc_mid_run_keeps_the_last_checkpoint_and_resume_finishes(config, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = state.save_tensors

    def disk_full_at_step_2(path, tensors):
        if Path(path).parent.name.startswith(".step-00002."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, tensors)

    monkeypatch.setattr(state, "save_tensors", disk_full_at_step_2)
    assert main(["-q", "train", str(config), "--out", str(out)]) == 1
    line = error_line(capsys)
    assert line.startswith("protopnet train: error: could not save step 2 (push, epoch 1) in ")
    assert "No space left on device" in line and "the checkpoint step-00001 is intact" in line and "--resume" in line
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-00000", "step-00001"]
    assert leftovers(out) == []  # the half-written checkpoint was removed, not left to confuse
    assert_whole(out)

    monkeypatch.setattr(state, "save_tensors", real)  # space was freed
    assert main(["-q", "train", str(config), "--out", str(out), "--resume"]) == 0
    same_weights(uninterrupted, out)


def test_read_only_output_is_refused_before_any_work(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = Path.write_bytes

    def read_only(self, data):
        if self.name == ".write-test":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    started = []
    monkeypatch.setattr(loop.Trainer, "_train_epoch", lambda self, step: started.append(step))
    assert main(["-q", "train", str(config), "--out", str(out)]) == 1
    assert error_line(capsys) == f"protopnet train: error: cannot write to {out}: Read-only file system (is it read-only or is the disk full?)"
    assert not started and not (out / "checkpoints").exists()


# -- real: a small tmpfs, filled up, then remounted read-only -------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(path: Path) -> Path:
    ballast = path / "ballast"
    chunk = b"\1" * (1 << 20)
    with contextlib.suppress(OSError), open(ballast, "wb") as handle:
        while True:
            handle.write(chunk)
            handle.flush()
    return ballast


def test_real_full_disk_then_read_only_then_resume(config, uninterrupted, tmp_path, monkeypatch, capsys):
    with tmpfs(tmp_path / "mnt", "size=96m") as mnt:
        out = mnt / "run"
        ballast: list[Path] = []
        fail_writes_after(monkeypatch, 0, lambda: ballast.append(fill(mnt)))  # the disk fills up after step 0
        assert main(["-q", "train", str(config), "--out", str(out)]) == 1
        line = error_line(capsys)
        assert "could not save step 1 (joint, epoch 1)" in line and "No space left on device" in line
        assert "the checkpoint step-00000 is intact" in line
        assert leftovers(out) == []
        ballast[0].unlink()

        # Room again; then the directory turns read-only after step 2.
        fail_writes_after(monkeypatch, 2, lambda: remount(mnt, "ro"))
        assert main(["-q", "train", str(config), "--out", str(out), "--resume"]) == 1
        line = error_line(capsys)
        assert "could not save step 3 (last_layer, epoch 1)" in line and "Read-only file system" in line
        assert "the checkpoint step-00002 is intact" in line
        assert_whole(out)

        # While it is read-only, a resume stops before any work, with the reason.
        assert main(["-q", "train", str(config), "--out", str(out), "--resume"]) == 1
        assert "Read-only file system (is it read-only or is the disk full?)" in error_line(capsys)

        remount(mnt, "rw")
        monkeypatch.setattr(loop.Trainer, "_after_step", AFTER_STEP)
        assert main(["-q", "train", str(config), "--out", str(out), "--resume"]) == 0
        same_weights(uninterrupted, out)
        assert json.loads((out / "results.json").read_text())["selected_step"] == 3
