"""Every subcommand, given a bad argument — a missing model directory, a --data path that is not
a dataset, an unknown config key, an invalid value — exits non-zero with one line that names the
bad value: no traceback, nothing written."""

from __future__ import annotations

import pytest

from protopnet.checkpoint import save_model
from protopnet.cli import COMMANDS, build_parser, main

from conftest import tiny_model

MISSING = "/nonexistent/protopnet-model"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    model = tiny_model(num_classes=3)
    save_model(model, base / "model")
    (base / "tiny.yaml").write_text("model: {backbone: tiny_cnn, pretrained: false}\ndata: {image_size: 32}\n")
    (base / "broken.yaml").write_text("model: {backbone: tiny_cnn\n")
    (base / "list.yaml").write_text("- model\n- data\n")
    (base / "empty_dir").mkdir()
    (base / "not_a_tree").mkdir()
    (base / "not_a_tree" / "file.txt").write_text("x")
    (base / "picture.txt").write_text("not a picture")
    return base


# (argv with {base} / {model} placeholders, text the error line must contain)
CASES = [
    # train: config file, keys, values, overrides, data
    (["train", "/nonexistent/config.yaml"], "config file '/nonexistent/config.yaml' does not exist"),
    (["train", "{base}"], "is a directory, not a YAML config file"),
    (["train", "{base}/broken.yaml"], "broken.yaml: not valid YAML"),
    (["train", "{base}/list.yaml"], "a config must be a mapping of sections"),
    (["train", "{base}/tiny.yaml", "model.bogus=1"], "model.bogus: unknown key; allowed keys in model: activation, add_on, backbone"),
    (["train", "{base}/tiny.yaml", "modle.backbone=x"], "modle: unknown key; allowed keys in config: data, loss, model"),
    (["train", "{base}/tiny.yaml", "data.batch_size=0"], "data.batch_size: expected a number > 0, got 0"),
    (["train", "{base}/tiny.yaml", "run.precision=fp64"], "run.precision: 'fp64' is not allowed; choose one of fp32, bf16, fp16"),
    (["train", "{base}/tiny.yaml", "schedule.epochs"], "override 'schedule.epochs': expected section.key=value"),
    (["train", "{base}/tiny.yaml", "data.root=/nonexistent/images", "--out", "{base}/run"], "/nonexistent/images: not a dataset"),
    (["train", "{base}/tiny.yaml", "data.root={base}/empty_dir", "--out", "{base}/run2"], "empty_dir: not a dataset"),
    # evaluate
    (["evaluate", MISSING, "--data", "synthetic"], f"{MISSING}: no such model directory"),
    (["evaluate", "{base}/empty_dir", "--data", "synthetic"], "empty_dir: not a protopnet model directory (no model.json)"),
    (["evaluate", "{model}", "--data", "/nonexistent/images"], "--data '/nonexistent/images': no such directory"),
    (["evaluate", "{model}", "--data", "{base}/not_a_tree"], "not_a_tree: not a dataset"),
    (["evaluate", "{model}", "--data", "synthetic", "--split", "tset"], "tset"),
    # push
    (["push", MISSING, "--data", "synthetic", "--out", "{base}/pushed"], f"{MISSING}: no such model directory"),
    (["push", "{model}", "--data", "/nonexistent/images", "--out", "{base}/pushed"], "--data '/nonexistent/images': no such directory"),
    # explain
    (["explain", MISSING, "{base}/picture.txt", "--out", "{base}/x"], f"{MISSING}: no such model directory"),
    (["explain", "{model}", "/nonexistent/bird.jpg", "--out", "{base}/x"], "/nonexistent/bird.jpg: file not found"),
    (["explain", "{model}", "{base}/picture.txt", "--out", "{base}/x"], "picture.txt: not an image"),
    (["explain", "{model}", "{base}/picture.txt", "--out", "{base}/x", "--top-classes", "0"], "--top-classes must be >= 1, got 0"),
    # analyze
    (["analyze", MISSING, "--data", "synthetic", "--out", "{base}/a"], f"{MISSING}: no such model directory"),
    (["analyze", "{model}", "--data", "/nonexistent/images", "--out", "{base}/a"], "--data '/nonexistent/images': no such directory"),
    (["analyze", "{model}", "--data", "synthetic", "--out", "{base}/a", "--k", "0"], "--k must be >= 1, got 0"),
    # prune
    (["prune", MISSING, "--data", "synthetic", "--out", "{base}/p"], f"{MISSING}: no such model directory"),
    (["prune", "{model}", "--data", "/nonexistent/images", "--out", "{base}/p"], "--data '/nonexistent/images': no such directory"),
    (["prune", "{model}", "--data", "synthetic", "--out", "{base}/p", "--threshold", "9"], "--threshold must be between 0 and --k (6), got 9"),
    # ensemble
    (["ensemble", "{model}", MISSING, "--out", "{base}/e"], f"{MISSING}: no such model directory"),
    # edit
    (["edit", MISSING, "--remove", "1", "--out", "{base}/ed"], f"{MISSING}: no such model directory"),
    (["edit", "{model}", "--remove", "one", "--out", "{base}/ed", "--iterations", "0"], "'one' is not an integer"),
    (["edit", "{model}", "--remove", "99", "--out", "{base}/ed", "--iterations", "0"], "99"),
    (["edit", "{model}", "--relabel", "1-2", "--out", "{base}/ed", "--iterations", "0"], "--relabel '1-2': expected J:CLASS"),
    # export
    (["export", MISSING, "--out", "{base}/m.onnx"], f"{MISSING}: no such model directory"),
    # demo
    (["demo", "--out", "{base}/demo", "model.bogus=1"], "model.bogus: unknown key"),
    (["demo", "--out", "{base}/demo", "schedule.epochs=-1"], "schedule.epochs: expected a number > 0, got -1"),
    # push-to-hub (and a Hub model given where a model directory goes)
    (["push-to-hub", MISSING, "me/model", "--dry-run"], f"{MISSING}: no such model directory"),
    (["push-to-hub", "{model}", "not a repo", "--dry-run"], "'not a repo' is not a Hub repository id: expected OWNER/NAME"),
    (["evaluate", "hf://just-a-name", "--data", "synthetic"], "'hf://just-a-name' is not a Hub model: expected hf://OWNER/NAME[@REVISION]"),
    # serve (refused before anything listens)
    (["serve", MISSING], f"{MISSING}: no such model directory"),
    (["serve", "{model}", "--port", "70000"], "--port 70000: expected 0..65535"),
    (["serve", "{model}", "--root-path", "pp"], "--root-path 'pp': expected a path starting with '/'"),
    (["serve", "{model}", "--data", "/nonexistent/images"], "--data '/nonexistent/images': no such directory"),
    # data
    (["data", "cub200", "/nonexistent/CUB", "--out", "{base}/prepared"], "/nonexistent/CUB"),
    (["data", "cars", "{base}/empty_dir", "--out", "{base}/prepared"], "empty_dir"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a[:1] + [x.split("/")[-1] for x in a[1:]])[:60] for a, _ in CASES])
def test_a_bad_argument_gives_one_line_naming_it(paths, argv, expected, capsys):
    argv = [item.format(base=paths, model=paths / "model") for item in argv]
    if argv[0] not in build_parser()._subparsers._group_actions[0].choices:  # noqa: SLF001
        pytest.skip(f"protopnet {argv[0]} is not in this installation")
    rc = main(["-q", *argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc != 0
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"protopnet {argv[0]}: error: "), lines[0]
    assert expected.format(base=paths) in lines[0], lines[0]


def test_every_command_is_covered():
    covered = {argv[0] for argv, _ in CASES}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered


def test_argparse_errors_name_the_bad_value(paths, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", str(paths / "model"), "--out", str(paths / "m.onnx"), "--format", "pickle"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "protopnet export: error: argument --format: invalid choice: 'pickle' (choose from 'onnx', 'torchscript')"
