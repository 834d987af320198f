"""What a run trains on and what it trains: the datasets a config names (``RunData``: the
augmented training view, the clean images push and the last layer read, the validation split and
the test split), the backbone's normalisation, and the ProtoPNet the config describes.

:class:`protopnet.train.loop.Trainer` builds these once at the start of a run (rank 0 first under
torchrun, so a decoded-image cache is written once); a test or a benchmark can build them itself
and hand ``data=`` / ``model=`` to the Trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..model.protopnet import ProtoPNet

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """The datasets of a run: ``train`` (augmented view), ``clean`` (the same images without
    augmentation: push, last layer, validation), ``test``, and the index lists.

    ``train_indices`` / ``val_indices`` index ``clean``. ``epoch_indices`` index ``train`` for the
    training epochs; None means ``train_indices`` (``train`` is a view of ``clean``). They differ
    when ``train`` is an offline-augmented tree (``data.offline_augmentation``)."""

    train: Any
    clean: Any
    test: Any | None
    train_indices: list[int]
    val_indices: list[int]
    epoch_indices: list[int] | None = None

    @property
    def training_items(self) -> list[int]:
        """The indices of ``train`` a training epoch goes through."""
        return self.train_indices if self.epoch_indices is None else self.epoch_indices

    @property
    def class_names(self) -> list[str]:
        return list(self.clean.classes)


def build_run_data(config: Config, mean: tuple[float, ...], std: tuple[float, ...], **dataset_kw: Any) -> RunData:
    """Build the datasets a config names (``data.root``), with the backbone's normalisation.

    ``dataset_kw`` go to :func:`protopnet.data.build_dataset` (e.g. ``classes=[...]`` for a
    CUB-200-2011 subset). With ``data.offline_augmentation`` the training epochs read
    ``<root>/train_augmented/`` (written by ``protopnet data``), leaving out the copies of the
    validation images.
    """
    from ..data import build_dataset, online_augmentation, train_val_split

    d = config.data
    extra: dict[str, Any] = {}
    if d.root == "synthetic":
        extra = {"num_classes": d.synthetic_classes, "seed": d.synthetic_seed}
    else:
        extra = {"crop": d.crop}
    extra.update(dataset_kw)
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path(config.output.dir) / "cache"
    common = dict(image_size=d.image_size, mean=mean, std=std)
    # The training pictures are read every epoch, by push and by validation: without the disk
    # cache and with loading in this process, each is decoded once and kept in memory. The
    # test split is read once, at the end, so it is not kept.
    kept_training_pictures = None
    if not d.cache and d.num_workers == 0 and d.memory_cache_max_gb > 0:
        from ..data import PictureMemory

        kept_training_pictures = PictureMemory(int(d.memory_cache_max_gb * 2**30))

    def make(split: str, augment: Any) -> Any:
        kw = dict(extra)
        if d.root == "synthetic":
            kw["images_per_class"] = d.synthetic_train_per_class if split == "train" else d.synthetic_test_per_class
        dataset = build_dataset(d.root, split=split, augment=augment, **common, **kw)
        if d.cache:
            from ..data import DecodedCache

            dataset = DecodedCache(dataset, cache_dir / split)
        elif split == "train" and kept_training_pictures is not None:
            from ..data import MemoryCache

            dataset = MemoryCache(dataset, kept_training_pictures)  # clean and augmented share the pictures
        return dataset

    augment = online_augmentation(d.image_size) if d.augment else None
    clean = make("train", None)
    train = make("train", augment) if augment is not None and not (d.offline_augmentation or d.augment_views) else clean
    try:
        test = make("test", None)
    except (FileNotFoundError, ValueError) as error:
        logger.warning("no test split (%s); only validation accuracy will be reported", error)
        test = None
    if d.val_fraction > 0:
        train_idx, val_idx = train_val_split(clean, d.val_fraction, config.run.seed)
    else:
        train_idx, val_idx = list(range(len(clean))), []
    epoch_idx = None
    if d.augment_views:
        from ..data import AugmentedViews

        train = AugmentedViews(clean, augment, d.augment_views, seed=config.run.seed)
        epoch_idx = train.items_of(sorted(train_idx))
    if d.offline_augmentation:
        from ..data import DecodedCache, ImageFolderDataset
        from ..data.prepare import offline_training_items

        folder = Path(d.root).expanduser() / "train_augmented"
        if not folder.is_dir():
            raise ValueError(f"data.offline_augmentation: {folder} does not exist; write it with "
                             f"'protopnet data cub200|cars SRC --out {d.root}'")
        train = ImageFolderDataset(folder, image_size=d.image_size, augment=augment, mean=mean, std=std, classes=list(clean.classes))
        if d.cache:
            train = DecodedCache(train, cache_dir / "train_augmented")
        epoch_idx = offline_training_items(train, clean, train_idx)
    return RunData(train, clean, test, sorted(train_idx), sorted(val_idx), epoch_idx)


def build_model(config: Config, class_names: list[str]) -> ProtoPNet:
    """The ProtoPNet a config describes, for ``class_names``."""
    m = config.model
    model = ProtoPNet(
        backbone=m.backbone,
        num_classes=len(class_names),
        prototypes_per_class=m.prototypes_per_class,
        prototype_dim=m.prototype_dim,
        prototype_size=m.prototype_size,
        add_on=m.add_on,
        activation=m.activation,
        distance=m.distance,
        pretrained=m.pretrained,
        epsilon=m.epsilon,
        class_names=class_names,
    )
    model.image_size = config.data.image_size
    return model


def backbone_normalisation(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the config's backbone expects of its input: the tiny test backbones' own,
    ImageNet's for every other backbone, pretrained or not."""
    from ..model.backbones import build_backbone

    if config.model.backbone.startswith("tiny_cnn"):
        built = build_backbone(config.model.backbone, pretrained=False)
        return built.mean, built.std
    from ..model.backbones import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD
