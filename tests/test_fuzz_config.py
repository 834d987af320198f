"""Fuzzing the config loader: whatever the mapping, YAML text or ``key=value`` override, the only
possible failure is a one-line :class:`ConfigError` naming what is wrong; what is accepted is a
valid config that survives a round trip through YAML."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import math
import shutil
import sys
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protopnet.config import Config, ConfigError, load_config

SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
KEYS = [f"{section}.{key}" for section, keys in FIELDS.items() for key in keys]

# Values of every YAML type, including the nasty ones: huge ints, NaN/inf, nested lists, dates.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, -1, 2**63, 10**400, 3, 224, 32]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["synthetic", "tiny_cnn", "resnet34", "log", "linear", "bbox", "full", "fp16", "cpu", "cuda:0", "auto", "regular"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
SECTION = st.one_of(
    st.dictionaries(st.sampled_from(sum(FIELDS.values(), [])), VALUES, max_size=5),  # known field names, any section
    st.dictionaries(st.text(max_size=8), VALUES, max_size=3),
    VALUES,
)
MAPPINGS = st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), SECTION, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), VALUES, max_size=3),
    VALUES,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def check_outcome(build):
    """Run ``build()``: a valid Config (that round-trips) or a clear one-line ConfigError."""
    try:
        config = build()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message, message
        assert len(message) < 2000, message  # bounded, even for huge / self-referencing values
        return None
    assert isinstance(config, Config)
    assert Config.from_dict(yaml.safe_load(config.to_yaml())) == config
    return config


@SETTINGS
@given(MAPPINGS)
@example({"model": {"prototypes_per_class": 10**400}})
@example({"loss": {"ce": 10**400}})
@example({"data": {"num_workers": -(10**5000)}})
@example({"model": {"prototype_size": [10**5000, 1]}})
@example({"model": None})
@example([1, 2])
@example({1: 2})
@example({"schedule": {"epochs": True}})
def test_from_dict_accepts_or_names_the_problem(data):
    check_outcome(lambda: Config.from_dict(data))


def test_self_referencing_and_exponential_values_are_refused_quickly():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ConfigError, match=r"model.prototype_size: expected a list of 2 values"):
        Config.from_dict({"model": {"prototype_size": loop}})
    laughs: list = ["lol"] * 10
    for _ in range(30):  # 10**30 leaves if ever copied or printed in full
        laughs = [laughs] * 10
    with pytest.raises(ConfigError, match=r"^model.backbone: expected a string, got \[\[\[") as info:
        Config.from_dict({"model": {"backbone": laughs}, "data": {"root": laughs}})
    assert len(str(info.value)) < 300


YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), st.dictionaries(st.sampled_from(sorted(FIELDS)), st.dictionaries(st.sampled_from(sum(FIELDS.values(), [])), SCALARS, max_size=4), max_size=3)),
    st.lists(st.sampled_from(["model:", "  backbone: tiny_cnn", "  prototype_size: [1, 1]", "data:", "  root: synthetic", "  image_size: 32",
                              "  batch_size: -1", "schedule: {epochs: 3}", "run: !!python/object/apply:os.system [echo hi]", "&a [*a]",
                              "a: &a [*a, *a]", "b: *a", "\t", "- 1", "? [x]\n: 1", "'", '"\\x', "\ufeff", "%YAML 1.1", "---", "...", "  pretrained: yes"]), max_size=8).map("\n".join),
)

_TMP = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
atexit.register(shutil.rmtree, _TMP, True)


@SETTINGS
@given(YAML_TEXT, st.sampled_from(["utf-8", "utf-16", "latin-1"]))
@example("a: " + "1" * 5000, "utf-8")
@example("a: &a [*a]\nmodel: {backbone: *a}", "utf-8")
@example("model:\n  backbone: résnet", "latin-1")
def test_load_config_on_any_yaml_text(text, encoding):
    path = _TMP / "config.yaml"
    try:
        path.write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        return
    check_outcome(lambda: load_config(path))


OVERRIDES = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["model", "model.x", "x.y", "model.backbone.z", ".", "=", "model."]), st.text(max_size=15)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(["1", "-1", "0", "1e999", "nan", ".inf", "[1, 2]", "[1", "{a: 1}", "null", "~", "yes", "2001-12-14",
                                                                                "1" * 5000, "[" * 300, "&a [*a]", "!!python/object/apply:os.system [x]", "'quoted'", " "])),
)


@SETTINGS
@given(st.lists(OVERRIDES, max_size=4))
@example(["data.root=2001-12-14", "run.device=0"])
@example(["model=3", "model.backbone=tiny_cnn"])
def test_overrides_accept_or_name_the_problem(items):
    base = {"model": {"backbone": "tiny_cnn", "pretrained": False}, "data": {"image_size": 32}}
    config = check_outcome(lambda: Config.from_dict(base, items))
    if config is None:
        return
    last = {}
    for item in items:  # the last override of a key wins
        key, _, raw = item.partition("=")
        last[key.strip()] = raw
    for key, raw in last.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except Exception:  # noqa: BLE001 - unparsable text is taken as text
            parsed = raw
        if isinstance(value, str):
            assert value in (raw, raw.strip(), parsed)
        elif isinstance(value, tuple):
            assert list(value) == parsed
        else:
            assert value == parsed


@contextlib.contextmanager
def shallow_stack(frames: int = 120):
    """Make Python's recursion limit hit ``frames`` below here (a cheap way to nest 'too deeply')."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model: {backbone: " + "[" * 200 + "]" * 200 + "}")
    with shallow_stack(), pytest.raises(ConfigError, match=r"deep.yaml: YAML nested too deeply"):
        load_config(path)
    with shallow_stack(), pytest.raises(ConfigError, match=r"override 'model.prototype_size=\[\[.*: value nested too deeply"):
        Config.from_dict({}, ["model.prototype_size=" + "[" * 200 + "]" * 200])


def test_exponents_without_a_dot_are_numbers_in_yaml_files(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-5` as a string; a researcher writes learning rates that way."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  backbone_lr: 1e-5\n  pretrain_lr: 2E-3\nloss:\n  l1: 3.5e-4\n  ce: 1e+0\n")
    config = load_config(path)
    assert (config.optim.backbone_lr, config.optim.pretrain_lr, config.loss.l1, config.loss.ce) == (1e-5, 2e-3, 3.5e-4, 1.0)
    for text in ("1e-5x", "e-5", "1e", "1.0.0"):  # not numbers: still refused, named
        with pytest.raises(ConfigError, match=r"optim.backbone_lr: expected a number"):
            Config.from_dict({"optim": {"backbone_lr": text}})


def test_text_overrides_keep_the_text():
    config = Config.from_dict({}, ["data.root=2001-12-14", "run.device=cpu", "data.cache_dir=null"])
    assert config.data.root == "2001-12-14" and config.data.cache_dir is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"backbone": "resnet9000"}}, r"model.backbone: unknown backbone 'resnet9000'; allowed: .*resnet34.*timm/<name>"),
        ({"model": {"activation": "relu"}}, r"model.activation: 'relu' is not allowed; choose one of log, linear"),
        ({"model": {"prototype_size": [0, 1]}}, r"model.prototype_size: expected two positive integers \[h, w\], got \[0, 1\]"),
        ({"data": {"crop": "tight"}}, r"data.crop: 'tight' is not allowed; choose one of bbox, full"),
        ({"data": {"val_fraction": 1.0}}, r"data.val_fraction: expected a number in \[0, 1\), got 1.0"),
        ({"data": {"batch_size": 0}}, r"data.batch_size: expected a number > 0, got 0"),
        ({"data": {"num_workers": -1}}, r"data.num_workers: expected an integer >= 0, got -1"),
        ({"data": {"image_size": "big"}}, r"data.image_size: expected an integer, got 'big'"),
        ({"data": {"imagesize": 3}}, r"data.imagesize: unknown key; allowed keys in data: .*image_size"),
        ({"schedule": {"push_every": 0}}, r"schedule.push_every: expected a number > 0, got 0"),
        ({"schedule": {"warm_epochs": -2}}, r"schedule.warm_epochs: expected an integer >= 0, got -2"),
        ({"optim": {"weight_decay": -0.1}}, r"optim.weight_decay: expected a number >= 0, got -0.1"),
        ({"optim": {"backbone_lr": math.inf}}, r"optim.backbone_lr: expected a finite number, got inf"),
        ({"loss": {"ce": "one"}}, r"loss.ce: expected a number, got 'one'"),
        ({"run": {"precision": "fp8"}}, r"run.precision: 'fp8' is not allowed; choose one of fp32, bf16, fp16"),
        ({"run": {"device": "tpu"}}, r"run.device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ({"run": {"channels_last": "yes"}}, r"run.channels_last: expected true or false, got 'yes'"),
        ({"run": {"seed": 2**64}}, r"run.seed: expected an integer between -2\*\*63 and 2\*\*63-1"),
        ({"output": {"keep_checkpoints": 0}}, r"output.keep_checkpoints: expected a number > 0, got 0"),
        ({"outputs": {}}, r"outputs: unknown key; allowed keys in config: data, loss, model, optim, output, run, schedule"),
    ],
)
def test_every_invalid_value_is_named_with_what_is_allowed(data, expected):
    with pytest.raises(ConfigError, match=expected):
        Config.from_dict(data)
