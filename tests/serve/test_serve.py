"""``protopnet serve``: the JSON API, the token, the upload limits, a fuzz of hostile requests, a
load of 400 requests from 8 clients, and the whole page flow in headless Chromium.

One server process (``python -m protopnet serve``, as a person starts it) serves one small pushed
model for the whole module, with an ImageFolder tree as ``--data``. The model's last layer is set
by hand so that the effect of an edit is known in advance: prototype ``J0`` (class 0) carries
every decision, so every test picture is called class 0 (3 of the 5 test pictures are class 0:
accuracy 60 %), and once ``J0`` is removed without a re-fit every picture is called class 1
(1 of 5: 20 %).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'protopnet[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'protopnet[serve]')")
pytest.importorskip("python_multipart", reason="the serve extra is not installed (pip install 'protopnet[serve]')")

import protopnet  # noqa: E402
from conftest import ROOT, ColourDataset, screenshot, tiny_model  # noqa: E402  (fixture browser: conftest.py)

SIZE = 64
CLASSES = ["blue", "green", "red"]  # sorted, as ImageFolder numbers its folders
TEST_COUNTS = (3, 1, 1)  # test pictures per class
J0, J1 = 0, 3  # the first prototype of class 0 and of class 1
TOKEN = "test-token-" + "x" * 20
LIMIT_MB = 2
SRC = ROOT / "src"


def png(picture: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format)
    return buffer.getvalue()


def write_tree(root: Path) -> None:
    """``root/train/<class>/*.png`` (4 per class) and ``root/test/<class>/*.png`` (TEST_COUNTS)."""
    train = ColourDataset(num_classes=3, per_class=4, image_size=SIZE, seed=0)
    test = ColourDataset(num_classes=3, per_class=3, image_size=SIZE, seed=1)
    for i in range(len(train)):
        path = root / "train" / CLASSES[train.targets[i]] / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        train.load_image(i).save(path)
    for i in range(len(test)):
        k = test.targets[i]
        if i - 3 * k < TEST_COUNTS[k]:
            path = root / "test" / CLASSES[k] / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            test.load_image(i).save(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base URL, model directory, data directory, server process)`` of a running server."""
    from protopnet.data import build_dataset

    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    write_tree(data)
    model = tiny_model(num_classes=3, prototypes_per_class=3, prototype_size=(2, 2), class_names=CLASSES)
    model.image_size, model.mean, model.std = SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = build_dataset(str(data), "train", image_size=SIZE, mean=model.mean, std=model.std)
    protopnet.push(model, train, batch_size=12)
    with torch.no_grad():
        model.last_layer.weight.zero_()
        model.last_layer.weight[0, J0] = 10_000.0
        model.last_layer.weight[1, J1] = 5.0
    model_dir = protopnet.save_model(model, root / "models" / "colours", dataset=train)
    env = dict(os.environ, PYTHONPATH=str(SRC), PROTOPNET_SERVE_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "protopnet", "serve", str(model_dir), "--data", str(data), "--port", "0",
         "--max-upload-mb", str(LIMIT_MB), "--max-pixels", "4000000", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r" at (http://127\.0\.0\.1:\d+/)", line)
        url = found.group(1) if found else None
    if url is None:
        process.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True).start()  # keep the pipe drained
    try:
        yield url, Path(model_dir), data, process, lines
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; 4xx/5xx answers are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, dict]:
    boundary = "----protopnet" + "".join(random.choice("abcdef0123456789") for _ in range(16))
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, kind) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {kind}\r\n\r\n'
        parts.append(head.encode("utf-8", "surrogateescape") + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_picture(url: str, data: bytes, filename: str = "picture.png", kind: str = "image/png", path: str = "api/explain") -> tuple[int, dict, bytes]:
    body, headers = multipart({}, {"image": (filename, data, kind)})
    return call(url + path, "POST", body, headers)


def sample_picture(seed: int = 1, index: int = 0) -> bytes:
    return png(ColourDataset(num_classes=3, per_class=3, image_size=SIZE, seed=seed).load_image(index))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def alive(url: str) -> None:
    status, _, body = call(url + "healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


# -- the API ----------------------------------------------------------------------------------------

def test_health_and_model(served):
    url, model_dir, *_ = served
    status, headers, body = call(url + "healthz")
    assert status == 200 and json.loads(body)["model"] == "colours"
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    info = json.loads(call(url + "api/model")[2])
    assert info["classes"] == CLASSES and info["num_prototypes"] == 9 and info["editable"] is True
    assert [p["class_index"] for p in info["prototypes"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert info["prototypes"][J0]["weight"] == 10_000.0
    assert info["prototypes"][J0]["source"]["path"].endswith(".png")  # push provenance
    assert info["architecture"]["backbone"] == "tiny_cnn" and info["history"] == []


def test_explain_returns_the_explanation_json_schema_and_points_add_up(served):
    url, model_dir, *_ = served
    picture = sample_picture()
    status, _, body = post_picture(url, picture)
    assert status == 200, body
    got = json.loads(body)
    model = protopnet.load_model(model_dir)
    expected = protopnet.explain(model, Image.open(io.BytesIO(picture)).convert("RGB"), top_classes=3, top_prototypes=10).to_json()
    assert set(got) == set(expected) and got["format"] == "protopnet-explanation"
    assert got["predicted"]["class_name"] == CLASSES[0]
    assert got["logits"] == pytest.approx(expected["logits"], rel=1e-5)
    assert [c["class_index"] for c in got["classes"]] == [c["class_index"] for c in expected["classes"]]
    for sheet in got["classes"]:
        assert math.fsum(row["points"] for row in sheet["prototypes"]) == pytest.approx(sheet["model_logit"], rel=1e-5, abs=1e-4)
    # the same picture sent as a raw body, and options in the query string
    status, _, body = call(url + "api/explain?top_classes=1&top_prototypes=2", "POST", picture, {"Content-Type": "image/png"})
    raw = json.loads(body)
    assert status == 200 and len(raw["classes"]) == 1 and len(raw["top_prototypes"]) == 2
    status, _, body = call(url + "api/explain?top_classes=0", "POST", picture, {"Content-Type": "image/png"})
    assert status == 400 and "top_classes must be from 1" in json.loads(body)["error"]


def test_edits_need_the_token_and_save_only_new_directories(served):
    url, model_dir, *_ = served
    edit = json.dumps({"remove": [J0], "reasons": {str(J0): "learned the background"}, "iterations": 0}).encode()
    json_headers = {"Content-Type": "application/json"}
    status, _, body = call(url + "api/edit", "POST", edit, json_headers)
    assert status == 401 and "token" in json.loads(body)["error"]
    status, _, body = call(url + "api/edit", "POST", edit, {**json_headers, "Authorization": "Bearer wrong"})
    assert status == 403
    auth = {**json_headers, "Authorization": f"Bearer {TOKEN}"}
    status, _, body = call(url + "api/edit", "POST", json.dumps({"remove": [J0], "iterations": 0}).encode(), auth)
    assert status == 400 and "give a reason for prototype(s) 0" in json.loads(body)["error"]
    status, _, body = call(url + "api/edit", "POST", json.dumps({"remove": [99], "reasons": {"99": "x"}}).encode(), auth)
    assert status == 400 and "99" in json.loads(body)["error"]
    status, _, body = call(url + "api/edit", "POST", json.dumps({"remove": [J0], "path": "/etc"}).encode(), auth)
    assert status == 400 and "unknown field" in json.loads(body)["error"]

    status, _, body = call(url + "api/edit", "POST", edit, auth)
    assert status == 200, body
    draft = json.loads(body)
    assert draft["accuracy_before"]["test"] == pytest.approx(0.6) and draft["accuracy_after"]["test"] == pytest.approx(0.2)
    assert draft["removed"] == [J0] and draft["prototypes"] == 8
    assert json.loads(call(url + "api/model")[2])["num_prototypes"] == 9  # the served model is unchanged

    status, _, body = call(url + "api/save", "POST", json.dumps({"draft": draft["draft"]}).encode(), {**json_headers, "Authorization": "Bearer nope"})
    assert status == 403
    before = set(model_dir.parent.iterdir())
    status, _, body = call(url + "api/save", "POST", json.dumps({"draft": draft["draft"]}).encode(), auth)
    assert status == 200, body
    saved = Path(json.loads(body)["out"])
    assert set(model_dir.parent.iterdir()) - before == {saved} and saved.parent == model_dir.parent
    assert saved.name.startswith("colours-edited-")
    edited = protopnet.load_model(saved)
    assert edited.num_prototypes == 8
    event = edited.history[-1]
    assert event["event"] == "edit" and event["what"]["removed"] == [J0]
    assert event["reasons"] == {str(J0): "learned the background"} and event["accuracy_after"]["test"] == pytest.approx(0.2)
    status, _, body = call(url + "api/save", "POST", json.dumps({"draft": draft["draft"]}).encode(), auth)
    assert status == 404  # a draft is saved once
    status, _, _ = call(url + "api/save", "POST", json.dumps({"draft": "../../etc"}).encode(), auth)
    assert status == 404


def test_upload_limits_and_bad_pictures_get_a_clear_4xx(served):
    url, *_ = served
    cases = {
        "not an image": (b"hello, this is text", 415, "not a usable picture"),
        "empty": (b"", 400, "empty"),
        "truncated": (sample_picture()[:200], 415, "truncated or corrupt"),
        "too many pixels": (png(Image.new("1", (3000, 2000))), 413, "exceeds the limit of 4000000 pixels"),
    }
    for name, (data, code, words) in cases.items():
        status, headers, body = post_picture(url, data)
        assert status == code, (name, body)
        message = json.loads(body)["error"]
        assert words in message and "Traceback" not in message and "/tmp" not in message, (name, message)
    status, _, body = call(url + "api/explain", "POST", os.urandom(3 * 1024 * 1024), {"Content-Type": "image/png"})
    assert status == 413 and "limit" in json.loads(body)["error"]
    status, _, body = call(url + "api/explain", "POST", b"{}", {"Content-Type": "application/json"})
    assert status == 415 and "not accepted" in json.loads(body)["error"]
    body, headers = multipart({"other": "x"}, {})
    status, _, answer = call(url + "api/explain", "POST", body, headers)
    assert status == 400 and "field 'image'" in json.loads(answer)["error"]
    status, _, answer = call(url + "nothing/here")
    assert status == 404 and b"Traceback" not in answer
    status, _, answer = call(url + "prototypes/../../../etc/passwd")
    assert status == 404 and b"root:" not in answer
    # the HTML form answers with the start page and the message
    status, _, page = post_picture(url, b"GIF89a nonsense", filename="x.gif", kind="image/gif", path="explain")
    assert status == 415 and b'role="alert"' in page and b"not a usable picture" in page
    alive(url)


def test_fuzz_random_bytes_truncations_and_hostile_names(served):
    url, _, _, process, lines = served
    rng = random.Random(0)
    good = sample_picture(seed=2, index=4)
    jpeg = png(Image.open(io.BytesIO(good)).convert("RGB"), "JPEG")
    hostile = ["../../../../etc/passwd", "..\\..\\boot.ini", "a\x00b.png", "<script>alert(1)</script>.png",
               "x" * 5000 + ".png", "%2e%2e%2fconfig", "résumé 🐦.png", "CON", "/dev/zero", ""]
    for i in range(60):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4000)))
        elif kind == 1:
            source = good if i % 8 == 1 else jpeg
            data = source[: rng.randrange(1, len(source))]
        elif kind == 2:
            data = bytearray(good)
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        else:
            data = good
        name = hostile[i % len(hostile)]
        status, _, body = post_picture(url, data, filename=name, path="api/explain" if i % 2 else "explain")
        assert status == 200 or 400 <= status < 500, (i, status, body[:300])
        assert b"Traceback" not in body and b"<script>alert(1)</script>" not in body
        if status == 200 and i % 2 == 0:
            assert b"Score sheet for" in body
    # a decompression bomb: a small file declaring a picture far above every limit
    bomb = png(Image.new("1", (20_000, 20_000)))
    assert len(bomb) < 2_000_000
    status, _, body = post_picture(url, bomb)
    assert status == 413 and "decompression bomb" in json.loads(body)["error"]
    assert process.poll() is None
    alive(url)
    assert not any("Traceback" in line for line in lines), "".join(lines)[-3000:]


def test_without_data_it_explains_but_does_not_edit(served):
    """The app in this process, on the same model without --data, as behind a reverse proxy that
    serves it under /pp (and strips the prefix): a gallery of the prototypes' own pictures, no
    editing (409), links under the prefix; the command's defaults keep it on this computer."""
    import uvicorn

    from protopnet.cli import build_parser
    from protopnet.serve import create_app, session_for

    _, model_dir, *_ = served
    args = build_parser().parse_args(["serve", str(model_dir)])
    assert args.host == "127.0.0.1" and args.data is None and args.out is None
    server = uvicorn.Server(uvicorn.Config(create_app(session_for(model_dir), token=TOKEN), host="127.0.0.1", port=0, log_level="warning", root_path="/pp"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    try:
        assert json.loads(call(url + "api/model")[2])["editable"] is False
        status, _, page = call(url)
        assert status == 200 and b'href="/pp/prototypes/"' in page and b'action="/pp/explain"' in page
        assert f"curl -F image=@picture.png {url[:-1]}/pp/api/explain".encode() in page
        status, _, body = call(url + "api/explain?top_prototypes=x", "POST", b"", {"Content-Type": "image/png"})
        assert status == 400 and "top_prototypes must be a whole number" in json.loads(body)["error"]
        status, _, page = call(url + "prototypes/")
        assert status == 200 and page.count(b'class="card prototype-card"') == 9 and page.count(b'src="/pp/pictures/') == 18
        status, headers, picture = call(url + "pictures/4/patch.png")
        assert status == 200 and headers["content-type"] == "image/png" and Image.open(io.BytesIO(picture)).size[0] > 0
        assert [call(url + f"pictures/{where}")[0] for where in ("9/patch.png", "4/overlay.png", "-1/patch.png", "4/..%2F..%2Fmodel.json")] == [404] * 4
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        status, _, body = call(url + "api/edit", "POST", json.dumps({"remove": [1], "reasons": {"1": "x"}}).encode(), auth)
        assert status == 409 and "--data" in json.loads(body)["error"]
        status, _, page = call(url + "edit")
        assert status == 409 and b"--data" in page
        status, _, body = post_picture(url, sample_picture())
        assert status == 200 and json.loads(body)["input"]["path"] is None
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
def test_load_400_requests_from_8_clients_keep_memory_flat(served):
    url, _, _, process, _ = served
    pictures = [sample_picture(seed=3, index=i) for i in range(9)]
    expected = {}
    for i, data in enumerate(pictures):
        expected[i] = json.loads(post_picture(url, data)[2])["predicted"]["class_index"]

    def one(n: int) -> tuple[int, float, int]:
        i = n % len(pictures)
        started = time.perf_counter()
        status, _, body = post_picture(url, pictures[i])
        ok = status == 200 and json.loads(body)["predicted"]["class_index"] == expected[i]
        return (200 if ok else status), time.perf_counter() - started, i

    with ThreadPoolExecutor(8) as pool:  # warm-up round, then the measured load
        list(pool.map(one, range(40)))
    before = rss_kib(process.pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(400), timeout=240))
    seconds = time.perf_counter() - started
    after = rss_kib(process.pid)
    assert [r[0] for r in results] == [200] * 400
    latencies = sorted(r[1] for r in results)
    print(f"400 requests, 8 clients: {400 / seconds:.1f}/s, p50 {1000 * latencies[200]:.0f} ms, p95 {1000 * latencies[380]:.0f} ms, RSS {before} -> {after} KiB")
    assert after - before < 40 * 1024, f"server memory grew from {before} to {after} KiB"
    alive(url)


# -- as a person uses it: headless Chromium ---------------------------------------------------------

def shown_number(text: str) -> float:
    return float(text.replace("\u2212", "-").replace("points", "").replace("%", "").strip())


@pytest.mark.browser
def test_a_person_explains_a_picture_then_removes_a_prototype(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, model_dir, *_ = served
    wait = WebDriverWait(browser, 60)
    picture = tmp_path / "my picture.png"
    picture.write_bytes(sample_picture(seed=4, index=1))

    # upload: choosing the file sends it (the page's script submits the form)
    browser.get(url)
    assert "Drop a picture here" in browser.find_element(By.CSS_SELECTOR, "form.upload label").text
    screenshot(browser, tmp_path, "serve-home")
    browser.find_element(By.ID, "image").send_keys(str(picture))
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".predicted-class")))
    assert browser.find_element(By.CSS_SELECTOR, "header .subtitle").text == "my picture.png"
    api = json.loads(post_picture(url, picture.read_bytes())[2])
    assert browser.find_element(By.CSS_SELECTOR, ".predicted-class").text == api["predicted"]["class_name"]
    sheets = browser.find_elements(By.CSS_SELECTOR, "section.sheet")
    assert len(sheets) == len(api["classes"]) == 3
    for section, sheet in zip(sheets, api["classes"]):
        points = [shown_number(td.get_attribute("textContent")) for td in section.find_elements(By.CSS_SELECTOR, "tr.score-row td.points")]
        assert len(points) == len(sheet["prototypes"])
        total = shown_number(section.find_element(By.CSS_SELECTOR, ".sheet-total").text)
        assert total == pytest.approx(sheet["model_logit"], abs=1e-3 + 1e-6 * abs(sheet["model_logit"]))
        assert sum(points) == pytest.approx(total, abs=0.005 * len(points) + 0.001)  # each shown with 2 decimals
    broken = browser.execute_script("return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0
    screenshot(browser, tmp_path, "serve-explanation")

    # the gallery, with nearest patches since --data was given
    browser.get(url + "prototypes/")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".prototype-card")) == 9
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.nearest-patch")) > 9
    assert browser.execute_script("return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length") == 0

    # editing asks for the token first
    browser.get(url + "edit")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait.until(ready.presence_of_element_located((By.ID, "edit-form")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.prototype-row")) == 9
    browser.find_element(By.ID, f"remove-{J0}").click()
    iterations = browser.find_element(By.ID, "iterations")
    iterations.clear()
    iterations.send_keys("0")
    browser.find_element(By.ID, "edit-button").click()  # no reason given: refused, the choices kept
    wait.until(ready.presence_of_element_located((By.ID, "error")))
    assert "give a reason" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, f"remove-{J0}").is_selected()
    assert browser.find_element(By.ID, "iterations").get_attribute("value") == "0"
    browser.find_element(By.ID, f"reason-{J0}").send_keys("it looks at the background")
    screenshot(browser, tmp_path, "serve-edit-form")
    browser.find_element(By.ID, "edit-button").click()
    wait.until(ready.presence_of_element_located((By.ID, "accuracy")))
    row = browser.find_element(By.CSS_SELECTOR, '#accuracy tr[data-split="test"]')
    assert row.find_element(By.CSS_SELECTOR, ".before").text == "60.0%"
    assert row.find_element(By.CSS_SELECTOR, ".after").text == "20.0%"
    assert "it looks at the background" in browser.find_element(By.ID, "changes").text
    screenshot(browser, tmp_path, "serve-edit")
    browser.find_element(By.ID, "save-button").click()
    wait.until(ready.presence_of_element_located((By.ID, "saved-path")))
    saved = Path(browser.find_element(By.ID, "saved-path").text)
    assert saved.parent == model_dir.parent and saved.is_dir()
    edited = protopnet.load_model(saved)
    assert edited.num_prototypes == 8 and edited.history[-1]["reasons"] == {str(J0): "it looks at the background"}
    from protopnet.data import build_dataset

    test = build_dataset(str(served[2]), "test", image_size=SIZE, mean=edited.mean, std=edited.std)
    assert protopnet.evaluate(edited, test)["accuracy"] == pytest.approx(0.2)
