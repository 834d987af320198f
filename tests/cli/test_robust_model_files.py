"""Untrusted model directories: whatever model.json says — wrong types, huge sizes, deep nesting,
non-UTF-8 bytes, paths or symlinks leading out of the directory — loading either rebuilds the
model or refuses with a one-line CheckpointError; it never runs code, never reads files outside
the directory and never allocates what the (checksummed) tensor file does not hold."""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protopnet import load_model
from protopnet.checkpoint import CheckpointError, save_model
from protopnet.cli import main

from conftest import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model(num_classes=3, prototypes_per_class=2, prototype_dim=8)
    model.provenance = [{"prototype": j, "images": {"patch": f"prototypes/{j}-patch.png"}} for j in range(6)]
    directory = save_model(model, tmp_path_factory.mktemp("model") / "model")
    (directory / "prototypes").mkdir()
    for j in range(6):
        (directory / "prototypes" / f"{j}-patch.png").write_bytes(b"png")
    return directory


def copy_with(model_dir: Path, target: Path, edit=None, raw: bytes | None = None) -> Path:
    shutil.copytree(model_dir, target, symlinks=True)
    if raw is not None:
        (target / "model.json").write_bytes(raw)
    elif edit is not None:
        meta = json.loads((model_dir / "model.json").read_text())
        edit(meta)
        (target / "model.json").write_text(json.dumps(meta))
    return target


def refused(directory: Path, pattern: str) -> str:
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(directory)
    assert time.perf_counter() - start < 10  # nothing huge was built
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_the_untouched_copy_loads(model_dir, tmp_path):
    model = load_model(copy_with(model_dir, tmp_path / "m"))
    assert model.num_classes == 3 and model.prototypes.shape == (6, 8, 1, 1)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        (("architecture", "num_classes"), 10**12, r"architecture.num_classes is 1000000000000, but the tensors need 3"),
        (("architecture", "prototype_dim"), 10**9, r"architecture.prototype_dim is 1000000000, but the tensors need 8"),
        (("architecture", "prototype_size"), [100000, 100000], r"architecture.prototype_size is \[100000, 100000\], but the tensors need \[1, 1\]"),
        (("architecture", "prototype_classes"), list(range(10**5)), r"architecture.prototype_classes is \[0, 1, 2.*\.\.\., but the tensors need a list of 6"),
        (("architecture", "class_names"), ["x"] * 10**5, r"architecture.class_names is .*, but the tensors need a list of 3 strings"),
        (("architecture", "num_classes"), "3", r"architecture.num_classes is '3'"),
        (("architecture", "epsilon"), "tiny", r"architecture.epsilon is 'tiny', but the tensors need a number"),
        (("architecture", "backbone"), "timm/does_not_exist", r"architecture does not match this protopnet"),
        (("architecture", "backbone"), ["tiny_cnn"], r"architecture.backbone is \['tiny_cnn'\], but the tensors need a string"),
        (("architecture", "bogus"), 1, r"architecture does not match this protopnet"),
        (("architecture",), [1, 2], r"'architecture' must be a mapping"),
        (("image", "size"), 10**9, r"'image.size' must be an integer in \[1, 16384\], got 1000000000"),
        (("image", "size"), -3, r"'image.size' must be an integer"),
        (("image",), "big", r"'image.size' must be an integer .* got 'big'"),
        (("tensors",), None, r"'tensors' must be a mapping"),
        (("tensors", "file"), "../../../etc/passwd", r"points outside the model directory"),
        (("tensors", "file"), "/etc/passwd", r"must be relative"),
        (("tensors", "file"), 7, r"must be relative"),
        (("tensors", "sha256"), "0" * 64, r"checksum mismatch"),
        (("version",), "1; rm -rf /", r"'version' must be an integer"),
        (("version",), 99, r"written by a newer protopnet"),
        (("kind",), ["protopnet"], r"'kind' must be a string"),
        (("kind",), "os.system", r"unknown model kind 'os.system'"),
        (("provenance",), {"images": 1}, r"'provenance' must be a list"),
        (("provenance",), [7], r"each provenance entry must be a mapping"),
        (("provenance",), [{"images": {"patch": "../../outside.png"}}], r"points outside the model directory"),
        (("history",), "edits", r"'history' must be a list"),
    ],
)
def test_odd_and_huge_values_are_refused_by_name(model_dir, tmp_path, key, value, pattern):
    def edit(meta):
        target = meta
        for k in key[:-1]:
            target = target[k]
        target[key[-1]] = value

    refused(copy_with(model_dir, tmp_path / "m", edit), pattern)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b'{"format": "protopnet-model", "kind": "\xff\xfe"}', r"model.json: not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, r"model.json: (JSON nested too deeply|not valid JSON|not a protopnet model description)"),
        (b"", r"model.json: not valid JSON"),
        (b'{"format": "protopnet-model", "version": 1' + b"0" * 5000 + b"}", r"model.json: not valid JSON \(Exceeds the limit"),
        (b"null", r"not a protopnet model description"),
        (b'{"format": "protopnet-model", "version": NaN}', r"'version' must be an integer"),
    ],
    ids=["not-utf8", "deep", "empty", "null", "huge-int", "nan-version"],
)
def test_unreadable_model_json(model_dir, tmp_path, raw, pattern):
    """(Parametrised with ids below: pytest cannot print some of these values.)"""
    refused(copy_with(model_dir, tmp_path / "m", raw=raw), pattern)


def test_symlinks_out_of_the_model_directory_are_refused(model_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # the very same tensors (the checksum matches), but reached through a link out of the directory
    shutil.copy(model_dir / "model.safetensors", outside / "model.safetensors")
    linked = copy_with(model_dir, tmp_path / "tensors")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside / "model.safetensors")
    refused(linked, r"path 'model.safetensors' in model.json points outside the model directory")

    shutil.copy(model_dir / "model.json", outside / "model.json")
    linked = copy_with(model_dir, tmp_path / "json")
    (linked / "model.json").unlink()
    (linked / "model.json").symlink_to(outside / "model.json")
    refused(linked, r"path 'model.json' in model.json points outside the model directory")

    linked = copy_with(model_dir, tmp_path / "pictures")
    shutil.rmtree(linked / "prototypes")
    (linked / "prototypes").symlink_to(outside, target_is_directory=True)
    refused(linked, r"path 'prototypes/0-patch.png' in model.json points outside the model directory")

    # a link that stays inside is fine
    inside = copy_with(model_dir, tmp_path / "inside")
    (inside / "tensors.bin.safetensors").write_bytes((inside / "model.safetensors").read_bytes())
    (inside / "model.safetensors").unlink()
    (inside / "model.safetensors").symlink_to("tensors.bin.safetensors")
    assert load_model(inside).num_classes == 3


def test_the_cli_reports_a_hostile_model_in_one_line(model_dir, tmp_path, capsys):
    def edit(meta):
        meta["architecture"]["prototype_dim"] = 10**9

    hostile = copy_with(model_dir, tmp_path / "m", edit)
    assert main(["-q", "evaluate", str(hostile), "--data", "synthetic"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"protopnet evaluate: error: {hostile}/model.json: architecture.prototype_dim is 1000000000, but the tensors need 8"]


# -- fuzzing: any JSON anywhere in model.json ----------------------------------------------------

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 3, 6, 8, -1, 10**12]),
              st.floats(allow_nan=True), st.text(max_size=8), st.sampled_from(["tiny_cnn", "log", "regular", "../x", "/etc/passwd", "prototypes/0-patch.png"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
_TMP = Path(tempfile.mkdtemp(prefix="fuzz-model-json-"))
atexit.register(shutil.rmtree, _TMP, True)


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from paths(v, (*prefix, i))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_model_json_loads_or_is_refused_in_one_line(model_dir, data):
    meta = json.loads((model_dir / "model.json").read_text())
    edits = data.draw(st.lists(st.tuples(st.sampled_from(sorted(paths(meta), key=repr)[1:]), JSON, st.booleans()), min_size=1, max_size=3))
    meta = copy.deepcopy(meta)
    for path, value, delete in edits:
        target = meta
        try:
            for k in path[:-1]:
                target = target[k]
            if delete:
                del target[path[-1]]
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit changed the shape
    directory = _TMP / "model"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(model_dir, directory)
    (directory / "model.json").write_text(json.dumps(meta))
    try:
        model = load_model(directory)
    except CheckpointError as error:
        assert "\n" not in str(error) and len(str(error)) < 600, str(error)
        return
    assert model.prototypes.shape == (6, 8, 1, 1)  # what loaded is what the tensors hold


def test_a_loader_meeting_a_malformed_field_raises_checkpoint_error(model_dir, tmp_path, monkeypatch):
    from protopnet import checkpoint

    monkeypatch.setitem(checkpoint.LOADERS, "robust-test", lambda directory, meta, device: meta["members"][0]["path"])
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model.json").write_text(json.dumps({"format": "protopnet-model", "version": 1, "kind": "robust-test", "members": 3}))
    refused(odd, r"odd/model.json: malformed robust-test description \(TypeError")
    # the ensemble loader, given an odd field
    ensemble = tmp_path / "ensemble"
    shutil.copytree(model_dir, ensemble / "members" / "0")
    meta = {"format": "protopnet-model", "version": 1, "kind": "ensemble", "members": ["members/0"], "image": [224]}
    (ensemble / "model.json").write_text(json.dumps(meta))
    refused(ensemble, r"ensemble/model.json: ")
