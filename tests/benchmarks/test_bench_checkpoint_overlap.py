"""benchmarks/bench_checkpoint_overlap.py: the batches timed alone and beside checkpoint writers
that really write, at both priorities."""

from __future__ import annotations

import re

from conftest import load_benchmark


def test_every_mode_is_timed_beside_real_checkpoint_writes(capsys, monkeypatch):
    bench = load_benchmark("bench_checkpoint_overlap")
    written = []
    real_save = bench.save_tensors
    monkeypatch.setattr(bench, "save_tensors", lambda path, tensors: (written.append((path, sum(t.numel() for t in tensors.values()))), real_save(path, tensors))[1])
    bench.main(["--backbone", "tiny_cnn", "--image-size", "32", "--batch-size", "2", "--batches", "2", "--checkpoint-mb", "2",
                "--writes", "2", "--threads", "1", "--precision", "fp32", "--repeats", "2"])
    table = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(r"^\| (batches alone|beside [^|]+) \| ([\d.]+) \| ([\d.]+) \|$", table, re.M)}
    assert list(rows) == list(bench.MODES)
    assert rows["batches alone"][1] == 1.0 and all(seconds > 0 for seconds, _ in rows.values())
    assert len(written) == 2 * 2 * 2  # two writer modes x two repeats x two writes
    assert all(count == 2 * 2**20 // 4 for _, count in written)  # 2 MiB of float32 each
