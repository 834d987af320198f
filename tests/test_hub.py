"""The Hugging Face Hub, without a network: loading by repo id from a cache laid out as
huggingface_hub lays it out (HF_HUB_OFFLINE=1), the exact files and commit a push sends (captured
from huggingface_hub's own CommitOperation objects), and hostile repositories refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi  # noqa: E402
from huggingface_hub.file_download import repo_folder_name  # noqa: E402

try:
    from huggingface_hub.utils.sha import git_hash  # noqa: E402
except ImportError:  # huggingface_hub < 0.21: the git blob hash, computed as git does

    def git_hash(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

from protopnet import CheckpointError, ProtoPNet, UnsafeCheckpointError, load_model, save_model  # noqa: E402
from protopnet.cli import main  # noqa: E402
from protopnet.ensemble import Ensemble, save_ensemble  # noqa: E402
from protopnet.hub import load_from_hub, parse_hub_spec, push_to_hub, upload_operations  # noqa: E402
from protopnet.model_card import record_evaluation  # noqa: E402
from protopnet.train.push import push_prototypes  # noqa: E402

from conftest import ColourDataset, tiny_model  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOPNET_CACHE", str(tmp_path / "protopnet-cache"))


@pytest.fixture
def model_dir(tmp_path):
    data = ColourDataset()
    model = tiny_model(class_names=["red", "green", "blue"]).eval()
    push_prototypes(model, data)
    path = save_model(model, tmp_path / "tiny", dataset=data)
    record_evaluation(path, {"test": {"split": "test", "data": "colours", "n": 18, "accuracy": 0.5, "top5": 1.0}})
    return path


def content(operation: CommitOperationAdd) -> bytes:
    source = operation.path_or_fileobj
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def published(model_dir: Path, repo_id: str) -> dict[str, bytes]:
    """What a repository holds after `push_to_hub` (plus the .gitattributes every Hub repo has)."""
    files = {op.path_in_repo: content(op) for op in upload_operations(model_dir, repo_id=repo_id)}
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    return files


def lay_out_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A downloaded snapshot as huggingface_hub's cache holds it (its documented layout): the
    contents in blobs/<etag> (the SHA-256 of a file stored with LFS, as .gitattributes says the
    tensors are, the git blob hash of the others), snapshots/<commit>/<path> a relative link to
    its blob, refs/main naming the commit."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for rel, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else git_hash(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage


def test_a_model_loads_by_repo_id_offline_from_the_hub_cache(model_dir, tmp_path):
    cache = tmp_path / "hf-cache"
    files = published(model_dir, "someone/tiny")
    lay_out_cache(cache, "someone/tiny", files)
    # huggingface_hub itself recognises the cache
    repos = {repo.repo_id: repo for repo in hub.scan_cache_dir(cache).repos}
    revision = next(iter(repos["someone/tiny"].revisions))
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert {f.file_path.relative_to(revision.snapshot_path).as_posix() for f in revision.files} == set(files)

    script = f"""
import hashlib, json, torch, protopnet
x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
out = {{}}
for name, model in [("main", protopnet.load_model("hf://someone/tiny")),
                    ("commit", protopnet.load_model("hf://someone/tiny@{COMMIT}")),
                    ("from_pretrained", protopnet.ProtoPNet.from_pretrained("someone/tiny"))]:
    with torch.no_grad():
        digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for _, t in sorted(model.state_dict().items()))).hexdigest()
        out[name] = {{"logits": model(x).logits.tolist(), "state": digest, "classes": model.class_names, "commit": model.hub_commit,
                      "provenance": [p["dataset_index"] for p in model.provenance], "dir": model.source_directory}}
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    original = load_model(model_dir)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(x).logits
    state = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for _, t in sorted(original.state_dict().items()))).hexdigest()
    for name, loaded in out.items():
        assert loaded["state"] == state, name  # the very same tensors, bit for bit
        # The outputs are computed in another process, whose thread count (and so the order of
        # float sums in the convolutions) may differ: equal up to float32 rounding, not bitwise.
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5, msg=name)
        assert loaded["classes"] == ["red", "green", "blue"] and loaded["commit"] == COMMIT
        assert loaded["provenance"] == [p["dataset_index"] for p in original.provenance]
    # the checked copy is a plain model directory: the model files, no links, no .gitattributes
    copy = Path(out["main"]["dir"])
    assert copy.is_relative_to(tmp_path / "protopnet-cache" / "hub")
    listing = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert listing == set(files) - {".gitattributes"}
    assert not any(p.is_symlink() for p in copy.rglob("*"))


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PROTOPNET_EXPLOIT_MARKER']}",))


def _hostile_cases(files: dict[str, bytes], tmp_path: Path) -> dict[str, tuple[dict[str, bytes], type, str]]:
    evil = pickle.dumps(Exploit())
    meta = json.loads(files["model.json"])
    escaping = json.loads(files["model.json"])
    escaping["provenance"][0]["images"]["patch"] = "../../../../../../etc/passwd"
    wrong = json.loads(files["model.json"])
    wrong["tensors"]["sha256"] = "0" * 64
    assert meta["tensors"]["sha256"] != wrong["tensors"]["sha256"]
    return {
        "pickle": ({**files, "pytorch_model.bin": evil}, UnsafeCheckpointError, "holds pytorch_model.bin, a pickle; refused"),
        "disguised-pickle": ({**files, "prototypes/0000_patch.png": evil}, UnsafeCheckpointError,
                             "prototypes/0000_patch.png is a pickle (it starts like one); refused"),
        "escaping-path": ({**files, "model.json": json.dumps(escaping).encode()}, CheckpointError,
                          "'../../../../../../etc/passwd' in model.json points outside the model directory"),
        "wrong-checksum": ({**files, "model.json": json.dumps(wrong).encode()}, CheckpointError,
                           "model.safetensors: checksum mismatch"),
    }


def test_a_hostile_repository_is_refused_in_one_line(model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "exploit-ran"
    monkeypatch.setenv("PROTOPNET_EXPLOIT_MARKER", str(marker))
    cache = tmp_path / "hf-cache"
    files = published(model_dir, "someone/tiny")
    for name, (repo_files, error, text) in _hostile_cases(files, tmp_path).items():
        lay_out_cache(cache, f"mallory/{name}", repo_files)
        with pytest.raises(error) as info:
            load_from_hub(f"hf://mallory/{name}", cache_dir=cache, local_files_only=True)
        message = str(info.value)
        assert message.startswith(f"hf://mallory/{name}") and text in message, message
        assert "\n" not in message
        assert str(tmp_path / "protopnet-cache") not in message  # names the repository, not the local copy
    # a snapshot file linked to somewhere outside the repository's cache folder
    secret = tmp_path / "secret.yaml"
    secret.write_text("token: hunter2\n")
    storage = lay_out_cache(cache, "mallory/link-out", files)
    link = storage / "snapshots" / COMMIT / "config.yaml"
    link.symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"^hf://mallory/link-out: config.yaml leads outside the repository"):
        load_from_hub("hf://mallory/link-out", cache_dir=cache, local_files_only=True)
    assert not marker.exists(), "loading must never execute code"
    # the same files, honest, load
    lay_out_cache(cache, "someone/tiny", files)
    load_from_hub("hf://someone/tiny", cache_dir=cache, local_files_only=True)


def test_online_the_file_list_is_checked_before_anything_is_downloaded(monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: [".gitattributes", "model.json", "model.safetensors", "model.pt"])

    def no_download(*args, **kwargs):
        raise AssertionError("a refused repository must not be downloaded")

    monkeypatch.setattr(hub, "snapshot_download", no_download)
    with pytest.raises(UnsafeCheckpointError, match=r"^hf://mallory/x: holds model.pt, a pickle; refused"):
        load_model("hf://mallory/x")


def test_a_repository_missing_from_the_offline_cache_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"^hf://someone/absent: cannot fetch") as info:
        load_from_hub("hf://someone/absent", cache_dir=tmp_path / "empty", local_files_only=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("spec", "expected"), [
    ("hf://owner/name", ("owner/name", None)),
    ("hf://owner/name@v1.0", ("owner/name", "v1.0")),
    ("hf://owner/name@refs/pr/3", ("owner/name", "refs/pr/3")),
    ("hf://owner/name@" + COMMIT, ("owner/name", COMMIT)),
])
def test_hub_specs(spec, expected):
    assert parse_hub_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf://name", "hf://a/b/c", "hf://../etc", "hf://owner/na me", "hf://owner/name@", "hf://owner/name@../x"])
def test_bad_hub_specs_are_refused(spec):
    with pytest.raises(CheckpointError, match="hf://"):
        parse_hub_spec(spec)


def test_a_push_sends_exactly_the_model_files_in_one_commit(model_dir, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create_repo", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: [
        ".gitattributes", "README.md", "model.json", "model.safetensors", "prototypes/0099_patch.png", "notes.txt"])

    def create_commit(self, repo_id, operations, **kw):
        calls["create_commit"] = (repo_id, list(operations), kw)
        return hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}", commit_message=kw["commit_message"],
                              commit_description=kw.get("commit_description") or "", oid=COMMIT)

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    (model_dir / "notes.txt").write_text("mine")  # not part of the format: stays home
    push_to_hub(model_dir, "someone/tiny", license="mit")

    assert calls["create_repo"] == ("someone/tiny", {"private": None, "exist_ok": True, "repo_type": "model"})
    repo_id, operations, kw = calls["create_commit"]
    added = {op.path_in_repo: op for op in operations if isinstance(op, CommitOperationAdd)}
    pictures = {p.relative_to(model_dir).as_posix() for p in (model_dir / "prototypes").glob("*.png")}
    assert len(pictures) == 18 and set(added) == {"README.md", "model.json", "model.safetensors"} | pictures
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in added)
    meta = json.loads((model_dir / "model.json").read_text())
    assert added["model.safetensors"].upload_info.sha256.hex() == meta["tensors"]["sha256"]
    assert content(added["model.json"]) == (model_dir / "model.json").read_bytes()
    card = content(added["README.md"]).decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit" and front["library_name"] == "protopnet"
    assert front["model-index"][0]["name"] == "someone/tiny" and front["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert 'protopnet.load_model("hf://someone/tiny")' in card
    # a stale picture of the previous push goes; files that are not the model's stay
    assert [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)] == ["prototypes/0099_patch.png"]
    assert kw["commit_message"] == "protopnet 0.1.0: ProtoPNet on tiny_cnn, 6 prototypes, 3 classes"
    assert meta["tensors"]["sha256"] in kw["commit_description"]
    # the command line sends the same commit and says where it went
    del calls["create_commit"]
    assert main(["-q", "push-to-hub", str(model_dir), "someone/tiny", "--license", "mit"]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["commit"] == COMMIT and said["load_with"] == "protopnet.load_model('hf://someone/tiny')"
    assert [op.path_in_repo for op in calls["create_commit"][1]] == [op.path_in_repo for op in operations]


def test_a_directory_with_a_pickle_or_bad_tensors_is_not_published(model_dir):
    (model_dir / "weights.pth").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(UnsafeCheckpointError, match=r"weights.pth, a pickle; refused .*not publishing it"):
        upload_operations(model_dir)
    (model_dir / "weights.pth").unlink()
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        upload_operations(model_dir)


def test_push_to_hub_dry_run_lists_what_would_be_sent(model_dir, capsys):
    assert main(["-q", "push-to-hub", str(model_dir), "someone/tiny", "--dry-run", "--license", "cc-by-4.0"]) == 0
    report = json.loads(capsys.readouterr().out)
    operations = upload_operations(model_dir, repo_id="someone/tiny", license="cc-by-4.0")
    assert [f["path"] for f in report["files"]] == [op.path_in_repo for op in operations]
    assert [f["sha256"] for f in report["files"]] == [op.upload_info.sha256.hex() for op in operations]
    assert report["repo_id"] == "someone/tiny" and report["revision"] == "main"


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").is_file()
    loaded = ProtoPNet.from_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    save_ensemble(Ensemble([tiny_model(seed=0), tiny_model(seed=1)]), tmp_path / "ens")
    with pytest.raises(CheckpointError, match=r"not a single ProtoPNet \(it holds a Ensemble\); load it with protopnet.load_model"):
        ProtoPNet.from_pretrained(str(tmp_path / "ens"))


def test_an_ensemble_goes_to_the_hub_and_back(tmp_path):
    ensemble = Ensemble([tiny_model(seed=0), tiny_model(seed=1)]).eval()
    save_ensemble(ensemble, tmp_path / "ens")
    files = published(tmp_path / "ens", "someone/ens")
    assert {"model.json", "README.md", "members/0/model.safetensors", "members/1/model.json", "members/1/README.md"} <= set(files)
    lay_out_cache(tmp_path / "hf-cache", "someone/ens", files)
    loaded = load_from_hub("hf://someone/ens", cache_dir=tmp_path / "hf-cache", local_files_only=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ensemble(x).logits)
