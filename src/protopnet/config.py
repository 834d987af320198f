"""Typed run configuration. YAML is only its serialisation.

A config has seven sections — ``model``, ``data``, ``schedule``, ``optim``, ``loss``, ``run`` and
``output`` — each a dataclass whose defaults reproduce the paper's reference setting. Unknown keys,
wrong types and out-of-range values are refused with a :class:`ConfigError` naming the key and
what is allowed. ``key=value`` overrides (``schedule.epochs=3``) are applied on top of a file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

# A float written with an exponent and no dot (`1e-5`, `-2E+3`): a string to PyYAML (YAML 1.1).
_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the allowed values."""


@dataclass
class ModelConfig:
    """The network (paper Section 2.1).

    ``prototype_init``: ``uniform`` (the paper: every coordinate uniform in [0, 1)) or
    ``patches`` — each prototype starts as the latent patch at a random place of a random
    training picture of its class (computed with the untrained add-on layers), so warm-up starts
    from prototypes that already resemble their class's patches — or ``distinctive``: each
    prototype starts on one of its class's most class-distinctive patches (those whose nearest
    patches in other training pictures are mostly of the same class; see
    :mod:`protopnet.train.prototype_init`), on different pictures, instead of a random place that
    is most often background.

    ``distance``: ``l2`` (the paper: squared L2 distance between a prototype and a latent patch)
    or ``cosine`` (one minus the cosine of the angle between them, in [0, 2]; Huang et al., ICCV
    2023, beyond the paper): a patch's direction decides, not its length. With L2 the nearest
    patch to a prototype is often the one whose length matches, not the one that shows the same
    thing; see docs/cub-experiments.md. The similarity (``activation``) applies to either.
    """

    backbone: str = "resnet34"
    prototypes_per_class: int = 10
    prototype_dim: int = 128
    prototype_size: tuple[int, int] = (1, 1)
    add_on: Literal["regular", "bottleneck", "none"] = "regular"
    activation: Literal["log", "linear"] = "log"
    distance: Literal["l2", "cosine"] = "l2"
    prototype_init: Literal["uniform", "patches", "distinctive"] = "uniform"
    pretrained: bool = True
    epsilon: float = 1e-4

    def validate(self) -> None:
        from .model.backbones import available_backbones

        if self.backbone not in available_backbones() and not self.backbone.startswith("timm/"):
            raise ConfigError(f"model.backbone: unknown backbone {_show(self.backbone)}; allowed: {', '.join(available_backbones())} or timm/<name>")
        _positive("model.prototypes_per_class", self.prototypes_per_class)
        _positive("model.prototype_dim", self.prototype_dim)
        if len(self.prototype_size) != 2 or min(self.prototype_size) < 1:
            raise ConfigError(f"model.prototype_size: expected two positive integers [h, w], got {list(self.prototype_size)}")
        _positive("model.epsilon", self.epsilon)


@dataclass
class DataConfig:
    """Where the images come from and how they are batched.

    ``root`` is ``synthetic`` (the built-in dataset), an ImageFolder tree, a CUB-200-2011 or a
    Stanford Cars directory. ``val_fraction`` of the training images (stratified) is held out for
    model selection; the test split is only ever reported.

    ``augment`` is the on-the-fly augmentation. ``offline_augmentation`` trains on the
    ``root/train_augmented/`` tree that ``protopnet data`` writes (the paper's setting: 30 fixed
    augmented copies of each training image) instead of ``root/train/``; push, the last layer and
    validation still use ``root/train/``, and the copies of validation images are left out.
    ``augment_views`` N > 0 makes the same kind of fixed copies in memory instead: each epoch goes
    through N views of every training picture, view 0 the picture itself and views 1..N-1 fixed
    random augmentations of it (seeded by run.seed, picture and view).

    ``feature_cache``: what the frozen part of the backbone makes of each training picture is
    computed once and kept in memory — the whole backbone's output in the warm-up epochs, the
    first ``schedule.frozen_backbone_blocks`` blocks' in the joint epochs — so later epochs skip
    decoding and the frozen layers (frozen blocks run in eval mode: batch-norm uses its running
    statistics). The frozen blocks' outputs are computed once for the whole run: the warm-up
    cache is made from them, and the last-layer stage reads them too (both are held during the
    warm-up). It needs pictures that are the same every epoch (``augment_views``,
    ``offline_augmentation`` or no augmentation) and each cache is skipped, with a warning, when
    it would take more than ``feature_cache_max_gb``.

    ``cache`` decodes every picture once into a file in ``cache_dir`` (default
    ``<output.dir>/cache``), which DataLoader workers and later runs share. Without it, and with
    ``num_workers: 0``, each training picture is decoded the first time the run reads it and kept
    in memory for the rest of the run, up to ``memory_cache_max_gb`` (2 GiB holds 14,000 pictures
    at 224 px; 0 turns it off): the same pixels, without decoding them again every epoch. The
    budget is per process: with ``torchrun`` each rank keeps the pictures it reads.
    """

    root: str = "synthetic"
    image_size: int = 224
    crop: Literal["bbox", "full"] = "bbox"
    augment: bool = True
    offline_augmentation: bool = False
    augment_views: int = 0
    val_fraction: float = 0.1
    batch_size: int = 80
    test_batch_size: int = 100
    push_batch_size: int = 75
    num_workers: int = 0
    cache: bool = False
    cache_dir: str | None = None
    memory_cache_max_gb: float = 2.0
    feature_cache: bool = False
    feature_cache_max_gb: float = 8.0
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 60
    synthetic_test_per_class: int = 20
    synthetic_seed: int = 0

    def validate(self) -> None:
        _positive("data.image_size", self.image_size)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: expected a number in [0, 1), got {self.val_fraction}")
        for name in ("batch_size", "test_batch_size", "push_batch_size", "synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"):
            _positive(f"data.{name}", getattr(self, name))
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected an integer >= 0, got {_show(self.num_workers)}")
        if self.augment_views < 0:
            raise ConfigError(f"data.augment_views: expected an integer >= 0, got {_show(self.augment_views)}")
        if self.augment_views and self.offline_augmentation:
            raise ConfigError("data.augment_views: choose fixed in-memory views or data.offline_augmentation, not both")
        if self.feature_cache and self.augment and not (self.augment_views or self.offline_augmentation):
            raise ConfigError(
                "data.feature_cache: needs training pictures that are the same every epoch — set data.augment_views "
                "(fixed augmented views), data.offline_augmentation, or data.augment: false"
            )
        _positive("data.feature_cache_max_gb", self.feature_cache_max_gb)
        if not (math.isfinite(self.memory_cache_max_gb) and self.memory_cache_max_gb >= 0):
            raise ConfigError(f"data.memory_cache_max_gb: expected a finite number >= 0 (0 turns the memory cache off), got {_show(self.memory_cache_max_gb)}")
        if self.offline_augmentation and self.root == "synthetic":
            raise ConfigError("data.offline_augmentation: needs data.root to be a directory written by 'protopnet data' (with train_augmented/), not synthetic")


@dataclass
class ScheduleConfig:
    """Training stages as data (paper Section 2.2; reference schedule).

    Epochs ``0 .. warm_epochs-1`` are warm-up (add-on + prototypes), the rest joint (backbone +
    add-on + prototypes, last layer fixed). After epoch ``e`` with ``e >= push_start`` and
    ``(e - push_start) % push_every == 0`` — and after the final epoch when ``push_at_end`` —
    prototypes are pushed and the last layer is optimised for ``last_layer_iterations`` passes.

    ``pretrain_epochs``: epochs of plain supervised training of the backbone (global max
    pooling + a temporary linear head, cross-entropy) before everything else — the offline stand-in
    for ImageNet weights when a backbone starts from scratch (the demo). 0, the paper's setting,
    starts from the given (pretrained) backbone.

    ``frozen_backbone_blocks``: the first N blocks of the backbone stay frozen in the joint stage
    too (see :func:`protopnet.train.stages.backbone_blocks`; 0, the paper's setting, trains the
    whole backbone). On a CPU this cuts a joint epoch's cost: no backward pass through them.

    ``freeze_backbone_batchnorm``: the backbone's batch-norm layers stay in eval mode (their
    ImageNet running statistics, not the batch's) in the warm-up and joint epochs, as push, the
    last-layer stage and evaluation see them: fine-tuning on a small dataset then cannot move
    the latent space between training and push (the usual practice when fine-tuning a
    pretrained network on little data). Off by default (the reference trains in train mode).

    ``prune``: after the final push, prune as in the paper's Section 2.6 (:func:`protopnet.prune.prune`):
    remove every prototype with fewer than ``prune_threshold`` of its ``prune_k`` nearest training
    patches from its own class (reference: 6 and 3) — the prototypes that settled on background
    or on parts every class shares. The last-layer stage that follows re-fits the remaining
    connections. Off by default (the paper's Table 1 is before pruning).

    ``restart`` (beyond the paper): after every push but the last, the prototypes that pruning's
    rule (``prune_k``, ``prune_threshold``) would remove start again on their class's most
    class-distinctive patches (as ``model.prototype_init: distinctive`` chooses them, under the
    trained network; :func:`protopnet.train.prototype_init.restart_on_distinctive_patches`), and
    training goes on with them — instead of leaving them on background until pruning drops them.
    Off by default.
    """

    epochs: int = 30
    warm_epochs: int = 5
    push_start: int = 10
    push_every: int = 10
    push_at_end: bool = True
    last_layer_iterations: int = 20
    joint_lr_step: int = 5
    joint_lr_gamma: float = 0.1
    frozen_backbone_blocks: int = 0
    pretrain_epochs: int = 0
    freeze_backbone_batchnorm: bool = False
    prune: bool = False
    prune_k: int = 6
    prune_threshold: int = 3
    restart: bool = False

    def is_push_epoch(self, epoch: int) -> bool:
        """Whether prototypes are pushed after ``epoch`` (0-based)."""
        regular = epoch >= self.push_start and (epoch - self.push_start) % self.push_every == 0
        return regular or (self.push_at_end and epoch == self.epochs - 1)

    def validate(self) -> None:
        _positive("schedule.epochs", self.epochs)
        for name in ("warm_epochs", "push_start", "last_layer_iterations", "frozen_backbone_blocks", "pretrain_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name}: expected an integer >= 0, got {_show(getattr(self, name))}")
        _positive("schedule.push_every", self.push_every)
        _positive("schedule.prune_k", self.prune_k)
        if not 0 <= self.prune_threshold <= self.prune_k:
            raise ConfigError(f"schedule.prune_threshold: expected an integer in [0, prune_k={self.prune_k}], got {_show(self.prune_threshold)}")
        if self.prune and not any(self.is_push_epoch(e) for e in range(self.epochs)):
            raise ConfigError("schedule.prune: needs a push to prune after; this schedule never pushes (set push_at_end: true)")
        _positive("schedule.joint_lr_step", self.joint_lr_step)
        _positive("schedule.joint_lr_gamma", self.joint_lr_gamma)


@dataclass
class OptimConfig:
    """Adam learning rates per parameter group (reference values), and weight averaging.

    ``ema_decay``: with a value in (0, 1), the warm-up and joint epochs keep an exponential moving
    average of the weights (``torch.optim.swa_utils.AveragedModel``: after every optimiser step
    ``average = decay * average + (1 - decay) * weights``), started afresh after each push; before
    each push — and at the end of a schedule that ends without one — the model takes the averaged
    weights, so push and the last layer work on them. Batch-norm running statistics are not
    averaged (the model keeps its own). The average spans about ``1 / (1 - decay)`` steps (100 at
    0.99): with few steps between pushes choose a smaller decay, or early weights weigh in (the
    demo, whose second push follows 4 short epochs, scores 0.96 at 0.99 against 0.99 without).
    0, the paper's setting, trains without averaging.
    """

    warm_add_on_lr: float = 3e-3
    warm_prototypes_lr: float = 3e-3
    backbone_lr: float = 1e-4
    add_on_lr: float = 3e-3
    prototypes_lr: float = 3e-3
    last_layer_lr: float = 1e-4
    pretrain_lr: float = 1e-3
    weight_decay: float = 1e-3
    ema_decay: float = 0.0

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "weight_decay":
                if value < 0:
                    raise ConfigError(f"optim.weight_decay: expected a number >= 0, got {value}")
            elif f.name == "ema_decay":
                if not 0 <= value < 1:
                    raise ConfigError(f"optim.ema_decay: expected 0 (no weight averaging) or a number in (0, 1) such as 0.99, got {_show(value)}")
            else:
                _positive(f"optim.{f.name}", value)


#: What ``loss.alignment_deep`` may name: the backbone's output or the add-on layers' output.
ALIGNMENT_DEEP = ("backbone", "latent")


@dataclass
class LossConfig:
    """Coefficients of the objective; ``separation`` is subtracted (negative).

    Beyond the paper (off by default): ``alignment`` weighs the shallow-deep feature alignment
    cost of Huang et al. (ICCV 2023, :func:`protopnet.losses.alignment_cost`) in the joint
    epochs, with ``alignment_threshold`` its tolerance and ``alignment_block`` the backbone block
    whose output is the shallow feature (an index into the backbone's blocks; None: the last
    block at stride 8 or finer, MobileNetV2's block 6, ResNet's layer2). ``alignment_deep`` names
    the deep features it aligns: ``backbone`` (the backbone's output, the add-on layers' input, as
    Huang et al. do) or ``latent`` (the add-on layers' output, the space the prototypes live in
    and push snaps them to). ``cluster_over: every``
    pulls every own-class prototype towards each picture, not only the nearest
    (:func:`protopnet.losses.cluster_cost`). ``focal`` weighs ProtoPool's focal similarity as a
    cost in the warm-up and joint epochs (:func:`protopnet.losses.focal_cost`: each own-class
    prototype's best cell should stand out from the picture's mean; cosine distance only).
    ``stability`` weighs stability training (Zheng et al., CVPR 2016) in the warm-up and joint
    epochs (:func:`protopnet.losses.stability_cost`): each own-class prototype's distance map on a
    picture and on the picture plus Gaussian noise of ``stability_noise`` (standard deviation on
    the normalised picture, clipped to 1.25 of it) should agree. It costs a second forward and
    backward pass per batch; with ``data.feature_cache`` each view gets one fixed noisy copy,
    cached beside it. ``diversity`` weighs a cost that keeps a class's prototypes apart in the
    warm-up and joint epochs (:func:`protopnet.losses.diversity_cost`): every pair of one class
    whose cosine similarity exceeds ``diversity_margin`` pays the squared excess, so push does
    not snap several prototypes onto one patch."""

    ce: float = 1.0
    cluster: float = 0.8
    cluster_over: str = "nearest"
    separation: float = -0.08
    l1: float = 1e-4
    alignment: float = 0.0
    alignment_threshold: float = 0.1
    alignment_block: int | None = None
    alignment_deep: str = "backbone"
    focal: float = 0.0
    stability: float = 0.0
    stability_noise: float = 0.2
    diversity: float = 0.0
    diversity_margin: float = 0.5

    def validate(self) -> None:
        for name in ("ce", "cluster", "separation", "l1", "alignment", "alignment_threshold", "focal", "stability", "stability_noise", "diversity", "diversity_margin"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"loss.{name}: expected a finite number, got {getattr(self, name)}")
        if self.cluster_over not in ("nearest", "every"):
            raise ConfigError(f"loss.cluster_over: expected 'nearest' (the paper) or 'every', got {self.cluster_over!r}")
        if self.alignment < 0:
            raise ConfigError(f"loss.alignment: expected a weight >= 0 (0 turns the alignment cost off), got {self.alignment}")
        if self.stability < 0:
            raise ConfigError(f"loss.stability: expected a weight >= 0 (0 turns stability training off), got {self.stability}")
        if not 0 < self.stability_noise <= 1:
            raise ConfigError(f"loss.stability_noise: expected a standard deviation in (0, 1] (normalised units), got {self.stability_noise}")
        if self.diversity < 0:
            raise ConfigError(f"loss.diversity: expected a weight >= 0 (0 turns the diversity cost off), got {self.diversity}")
        if not -1 <= self.diversity_margin < 1:
            raise ConfigError(f"loss.diversity_margin: expected a cosine similarity in [-1, 1), got {self.diversity_margin}")
        if self.focal < 0:
            raise ConfigError(f"loss.focal: expected a weight >= 0 (0 turns the focal cost off), got {self.focal}")
        if self.alignment_threshold < 0:
            raise ConfigError(f"loss.alignment_threshold: expected a tolerance >= 0, got {self.alignment_threshold}")
        if self.alignment_deep not in ALIGNMENT_DEEP:
            raise ConfigError(f"loss.alignment_deep: expected one of {', '.join(map(repr, ALIGNMENT_DEEP))}, got {_show(self.alignment_deep)}")
        if self.alignment_block is not None and self.alignment_block < 0:
            raise ConfigError(f"loss.alignment_block: expected a backbone block index >= 0 or null (automatic), got {self.alignment_block}")


@dataclass
class RunConfig:
    """How to run: seed, device and arithmetic.

    ``precision``: ``fp32``; ``bf16`` (autocast of the backbone and add-on; the prototype
    distances stay float32); ``fp16`` (GPUs only, with loss scaling); or ``auto``: ``bf16``
    where the hardware computes bfloat16 natively (a CPU with AMX or AVX-512 BF16, a GPU with
    bf16), ``fp32`` elsewhere, logged at the start of the run
    (:func:`protopnet.runtime.resolve_precision`).

    ``tensorboard``: also write the run to ``<output dir>/tensorboard/`` (the optional extra
    ``pip install 'protopnet[tensorboard]'``): every scalar of ``metrics.jsonl`` (which stays the
    record), the learning rates, and at each push a grid of the prototypes' source patches. Only
    rank 0 writes.

    ``compile``: run the warm-up, joint and pre-training forward and backward passes through
    :func:`torch.compile` (TorchInductor; on a CPU it needs a C++ compiler). Compiling takes
    seconds to minutes at the start of each stage; whether it pays depends on the backbone and
    the hardware (``benchmarks/bench_speed.py --compile`` measures it)."""

    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    channels_last: bool = False
    threads: int = 0
    tensorboard: bool = False
    compile: bool = False

    def validate(self) -> None:
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"run.device: expected auto, cpu, cuda, cuda:N or mps, got {_show(self.device)}")
        if self.threads < 0:
            raise ConfigError(f"run.threads: expected an integer >= 0 (0 = PyTorch's default), got {_show(self.threads)}")


@dataclass
class OutputConfig:
    """What a run writes.

    ``background_checkpoints``: write each step's checkpoint on a background thread while the
    next step runs (its tensors and bookkeeping are copied first, so it holds the run as it was
    after its step). A kill then loses at most the current step and, when it comes before the
    previous step's checkpoint is on disk, that step too; False writes the checkpoint before the
    next step starts, so a kill loses at most the current step. Either way a resumed run ends
    with the weights of an uninterrupted one."""

    dir: str = "runs/protopnet"
    save_prototype_images: bool = True
    keep_checkpoints: int = 2
    background_checkpoints: bool = True

    def validate(self) -> None:
        _positive("output.keep_checkpoints", self.keep_checkpoints)


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        if self.loss.focal > 0 and self.model.distance != "cosine":
            raise ConfigError(
                f"loss.focal needs model.distance: cosine (a bounded distance); with {self.model.distance!r} "
                "the cost has no lower bound. Set loss.focal: 0 or model.distance: cosine"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> "Config":
        merged = _deep_copy(data or {})
        if not isinstance(merged, dict):
            raise ConfigError(f"a config must be a mapping of sections ({', '.join(_names(cls))}), got {type(data).__name__}")
        for item in overrides:
            _apply_override(merged, item)
        config = _build(cls, merged, "")
        return config.validate()


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML config file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}".splitlines()[0]) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
        except ValueError as error:  # PyYAML lets int() errors through (numbers over 4300 digits)
            raise ConfigError(f"{path}: not valid YAML: {error}".splitlines()[0]) from None
    return Config.from_dict(data, overrides)


# -- the mapping machinery ----------------------------------------------------------------------

def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _positive(key: str, value: float) -> None:
    # ints are checked without float(): a huge int must not raise OverflowError
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if not (finite and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{key}: expected a number > 0, got {_show(value)}")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4


def _show(value: Any) -> str:
    """A bounded repr for error messages (YAML anchors can make huge or self-referencing values)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long for str() (Python's 4300-digit limit)
        text = f"<{type(value).__name__} too large to print>"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deep_copy(value: Any) -> Any:
    """Copy the config mapping and its section mappings (all that overrides change). Values are
    not copied: YAML anchors can make them self-referencing or exponentially large."""
    if isinstance(value, dict):
        return {k: dict(v) if isinstance(v, dict) else v for k, v in value.items()}
    return value


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. schedule.epochs=3")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. schedule.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw
    except RecursionError:
        raise ConfigError(f"override {_show(item)}: value nested too deeply") from None
    if not isinstance(value, str) and _is_text_field(parts[0], parts[1]) and not (value is None and raw.strip() in ("null", "~")):
        value = raw.strip()  # data.root=2001-12-14 or run.device=0 mean the text, not a date or number
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"section {parts[0]!r} must be a mapping, got {_show(section)}")
    section[parts[1]] = value


def _is_text_field(section: str, key: str) -> bool:
    hints = typing.get_type_hints(Config)
    if section not in hints:
        return False
    field_hint = typing.get_type_hints(hints[section]).get(key)
    return field_hint is str or (typing.get_origin(field_hint) in (types.UnionType, typing.Union) and str in typing.get_args(field_hint))


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_names(cls))}, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{_show(key) if not isinstance(key, str) else _show(key)[1:-1]}: unknown key; allowed keys in {where}: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(key, hint, data[f.name])
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {_show(value)} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: expected an integer between -2**63 and 2**63-1, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; YAML 1.2 and every
            # other reader call it a number, and so do we.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - a programming error
