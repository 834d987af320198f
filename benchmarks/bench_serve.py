"""Throughput of ``protopnet serve``: explanations per second and client-side latency (p50, p95) of
``POST /api/explain`` under concurrent clients, and the server's memory before and after.

Two models, each served by its own ``protopnet serve`` process on 127.0.0.1 (the clients run in
this process, so they do not share the server's interpreter):

* the demo model (``protopnet demo`` / ``make demo``: ``demo-out/model``), with pictures of the
  synthetic test split;
* a MobileNetV2 ProtoPNet at 224 px (ImageNet weights from ``$TORCH_HOME``, 30 classes x 10
  prototypes, 128 channels, as ``configs/cub200_mobilenet_v2_paper.yaml``), with 500 x 375 JPEG
  pictures. It is not trained: the cost of an explanation does not depend on the weights' values.

    TORCH_HOME=... python benchmarks/bench_serve.py --demo-model demo-out/model [--requests 400 --clients 8 --threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def explain_once(port: int, picture: bytes) -> tuple[int, float, int]:
    """(status, seconds, predicted class) of one raw-body ``POST /api/explain``."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/api/explain", body=picture, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        status, body = response.status, response.read()
    except OSError as error:  # a timeout or a dropped connection counts as a failure
        print(f"request failed: {error}", file=sys.stderr)
        status, body = 0, b""
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    predicted = json.loads(body)["predicted"]["class_index"] if status == 200 else -1
    return status, seconds, predicted


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, model_dir: Path, pictures: list[bytes], requests: int, clients: int, threads: int) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "protopnet", "-q", "serve", str(model_dir), "--port", str(port), "--threads", str(threads)]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"{name}: the server exited: {server.stderr.read()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        start_up = time.perf_counter() - started
        with ThreadPoolExecutor(clients) as pool:  # warm-up
            list(pool.map(lambda i: explain_once(port, pictures[i % len(pictures)]), range(2 * clients)))
        rss_before = rss_mib(server.pid)
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: explain_once(port, pictures[i % len(pictures)]), range(requests)))
        wall = time.perf_counter() - began
        rss_after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    failures = sum(1 for status, _, _ in results if status != 200)
    latencies = np.array([seconds for _, seconds, _ in results])
    return {
        "model": name, "requests": requests, "clients": clients, "server_threads": threads, "failures": failures,
        "explanations_per_s": round(requests / wall, 2), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1), "start_up_s": round(start_up, 2),
        "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
    }


def jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def demo_pictures(n: int = 16) -> list[bytes]:
    from protopnet.data import build_dataset

    test = build_dataset("synthetic", "test", image_size=64, num_classes=10)
    return [jpeg(test.load_image(i)) for i in range(n)]


def noise_pictures(n: int = 16, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [jpeg(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))) for _ in range(n)]


def mobilenet_model(directory: Path) -> Path:
    import torch

    import protopnet

    torch.manual_seed(0)
    model = protopnet.ProtoPNet(backbone="mobilenet_v2", num_classes=30, prototypes_per_class=10, prototype_dim=128,
                                prototype_size=(1, 1), pretrained=True)
    model.image_size = 224
    return protopnet.save_model(model, directory / "mobilenet_v2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-model", default="demo-out/model", help="the demo's model directory (default demo-out/model; run make demo first)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the server's PyTorch threads (default 1: on a shared machine, more threads wait on each other)")
    parser.add_argument("--skip-mobilenet", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    results = []
    demo = Path(args.demo_model)
    if (demo / "model.json").is_file():
        results.append(measure("demo (tiny_cnn, 64 px, 10 classes)", demo, demo_pictures(), args.requests, args.clients, args.threads))
    else:
        print(f"{demo}: no model (run `make demo` or pass --demo-model); skipped", file=sys.stderr)
    if not args.skip_mobilenet:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
            model_dir = mobilenet_model(Path(folder))
            results.append(measure("MobileNetV2 (224 px, 30 classes x 10 prototypes)", model_dir, noise_pictures(), args.requests, args.clients, args.threads))
    print(f"{'model':<50} {'expl/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'fail':>5} {'start s':>8} {'RSS MiB before -> after':>24}")
    for r in results:
        print(f"{r['model']:<50} {r['explanations_per_s']:>7.1f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} {r['failures']:>5d} "
              f"{r['start_up_s']:>8.1f} {r['rss_before_mib']:>11.0f} -> {r['rss_after_mib']:.0f}")
    print(f"({args.requests} requests from {args.clients} concurrent clients each; server on 127.0.0.1 with {args.threads} PyTorch threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
