"""`protopnet data`: crop + resize + offline augmentation written as ImageFolder trees.

A tiny CUB tree (non-contiguous ids, red birds in blue boxes on noise) checks that the pictures are
the boxed crops, that augmented copies are exactly the library's offline augmentation of their
source with the documented seed, that the output loads back with the right labels, that seeds,
worker counts and class subsets do not change the pictures, that an interrupted run resumes, and
that copies of validation images are kept out of training.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protopnet.cli import main
from protopnet.data import CUB200, ImageFolderDataset, build_dataset, offline_augment
from protopnet.data import prepare as prep
from protopnet.data.prepare import (
    SourceError,
    augmentation_rng,
    augmented_sources,
    offline_training_items,
    prepare_dataset,
    read_manifest,
)

from conftest import CUB_CLASSES, SHARED, make_cub

REAL_CUB = SHARED / "data" / "CUB_200_2011"

@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("src") / "CUB_200_2011")


@pytest.fixture(scope="module")
def prepared(cub, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare_dataset("cub200", cub, out, image_size=24, augment=1, seed=3, image_format="png")
    return out, manifest


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_counts_and_manifest(prepared):
    out, manifest = prepared
    names = sorted(CUB_CLASSES.values())
    assert read_manifest(out) == manifest
    assert manifest["classes"] == names and manifest["folders"] == names
    assert {k: v["pictures"] for k, v in manifest["splits"].items()} == {"train": 6, "test": 3, "train_augmented": 18}
    assert manifest["splits"]["train_augmented"]["settings"]["seed"] == 3
    for name in names:
        train = sorted(p.name for p in (out / "train" / name).iterdir())
        assert len(train) == 2 and len(list((out / "test" / name).iterdir())) == 1
        augmented = sorted(p.name for p in (out / "train_augmented" / name).iterdir())
        stems = [t[: -len(".png")] for t in train]
        assert augmented == sorted(f"{s}_aug{k:02d}.png" for s in stems for k in range(3))
    assert not list(out.glob(".*partial"))  # nothing left half-done


def test_pictures_are_the_box_crops_and_the_documented_augmentation(prepared, cub):
    out, _ = prepared
    source = CUB200(cub, "train", image_size=24)
    for index in range(len(source)):
        stem = Path(source.path(index)).stem
        folder = out / "train" / source.classes[source.targets[index]]
        clean = Image.open(folder / f"{stem}.png").convert("RGB")
        assert clean.size == (24, 24)
        expected = source.load_image(index)
        assert np.array_equal(np.asarray(clean), np.asarray(expected))
        pixels = np.asarray(clean, dtype=float)
        assert pixels[..., 0].mean() > 150 and pixels[..., 2].mean() < 80  # the red box, not the blue picture
        key = Path(source.path(index)).relative_to(cub).as_posix()
        copies = offline_augment(expected, augmentation_rng(3, key), 1)
        for k, copy in enumerate(copies):
            written = Image.open(out / "train_augmented" / folder.name / f"{stem}_aug{k:02d}.png").convert("RGB")
            assert np.array_equal(np.asarray(written), np.asarray(copy)), (stem, k)
        assert not np.array_equal(np.asarray(copies[0]), np.asarray(expected))
    test = CUB200(cub, "test", image_size=24)
    for index in range(len(test)):
        picture = Image.open(out / "test" / test.classes[test.targets[index]] / f"{Path(test.path(index)).stem}.png")
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(test.load_image(index)))


def test_the_output_loads_back_with_the_source_labels(prepared, cub):
    out, _ = prepared
    for split in ("train", "test"):
        source = CUB200(cub, split, image_size=24)
        loaded = build_dataset(out, split=split, image_size=24)
        assert loaded.classes == source.classes
        by_stem = {Path(loaded.path(i)).stem: loaded.targets[i] for i in range(len(loaded))}
        assert by_stem == {Path(source.path(i)).stem: source.targets[i] for i in range(len(source))}


def test_same_seed_same_pictures_whatever_the_workers_or_class_subset(prepared, cub, tmp_path):
    out, _ = prepared
    reference = files_of(out / "train_augmented")
    parallel = tmp_path / "parallel"
    prepare_dataset("cub200", cub.parent, parallel, image_size=24, augment=1, seed=3, image_format="png", workers=2)
    assert files_of(parallel / "train_augmented") == reference
    assert files_of(parallel / "train") == files_of(out / "train")
    subset = tmp_path / "subset"
    manifest = prepare_dataset("cub200", cub, subset, image_size=24, augment=1, seed=3, image_format="png", classes=1)
    assert manifest["classes"] == ["002.Laysan_Albatross"]  # the first class by id
    assert files_of(subset / "train_augmented") == {k: v for k, v in reference.items() if k.startswith("002.")}
    other = tmp_path / "other-seed"
    prepare_dataset("cub200", cub, other, image_size=24, augment=1, seed=4, image_format="png")
    changed = files_of(other / "train_augmented")
    assert changed.keys() == reference.keys() and all(changed[k] != reference[k] for k in reference)
    assert files_of(other / "train") == files_of(out / "train")


def test_an_interrupted_run_resumes_and_other_settings_are_refused(prepared, cub, tmp_path, monkeypatch):
    out, _ = prepared
    target = tmp_path / "resumed"
    calls = {"n": 0}
    real = prep.offline_augment

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "offline_augment", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("cub200", cub, target, image_size=24, augment=1, seed=3, image_format="png")
    assert (target / "train").is_dir() and not (target / "train_augmented").exists()
    assert (target / ".train_augmented.partial").is_dir()
    assert "train_augmented" not in read_manifest(target)["splits"]
    calls["n"] = -100
    prepare_dataset("cub200", cub, target, image_size=24, augment=1, seed=3, image_format="png")
    assert calls["n"] == -100 + 3  # only the three images not done before the interruption
    assert files_of(target / "train_augmented") == files_of(out / "train_augmented")
    assert not (target / ".train_augmented.partial").exists()

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset("cub200", cub, target, image_size=16, augment=1, seed=3, image_format="png")
    prepare_dataset("cub200", cub, target, image_size=16, augment=0, image_format="png", overwrite=True)
    assert {Image.open(p).size for p in (target / "train").rglob("*.png")} == {(16, 16)}
    assert {Image.open(p).size for p in (target / "train_augmented").rglob("*.png")} == {(24, 24)}  # augment=0 leaves it


def test_jpeg_output_and_its_size_setting(cub, tmp_path):
    manifest = prepare_dataset("cub200", cub, tmp_path / "jpg", image_size=20, augment=0)
    assert set(manifest["splits"]) == {"train", "test"}
    pictures = list((tmp_path / "jpg").rglob("*.jpg"))
    assert len(pictures) == 9 and {Image.open(p).format for p in pictures} == {"JPEG"}
    assert {Image.open(p).size for p in pictures} == {(20, 20)}


def test_a_wrong_source_names_what_was_expected(tmp_path, cub):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"images\.txt.*bounding_boxes\.txt.*images/"):
        prepare_dataset("cub200", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SourceError, match="no such directory"):
        prepare_dataset("cub200", tmp_path / "missing", tmp_path / "out")
    partial = tmp_path / "partial"
    make_cub(partial)
    (partial / "bounding_boxes.txt").unlink()
    with pytest.raises(SourceError, match=r"bounding_boxes\.txt missing") as error:
        prepare_dataset("cub200", partial, tmp_path / "out")
    assert "classes.txt missing" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SourceError, match="cars_train/"):
        prepare_dataset("cars", cub, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_copies_of_validation_images_stay_out_of_training(prepared, caplog):
    out, _ = prepared
    clean = build_dataset(out, split="train", image_size=24)
    augmented = ImageFolderDataset(out / "train_augmented", image_size=24, classes=clean.classes)
    sources = augmented_sources(augmented.files, clean.files)
    assert all(s is not None for s in sources)
    assert all(Path(augmented.files[a]).name.startswith(Path(clean.files[s]).stem + "_aug") for a, s in enumerate(sources))
    assert [clean.targets[s] for s in sources] == augmented.targets
    val = [0, 3]
    chosen = offline_training_items(augmented, clean, [i for i in range(len(clean)) if i not in val])
    assert len(chosen) == 3 * (len(clean) - len(val))
    assert not {sources[i] for i in chosen} & set(val)
    stray = out / "train_augmented" / clean.classes[0] / "foreign.png"
    Image.new("RGB", (24, 24)).save(stray)
    try:
        augmented = ImageFolderDataset(out / "train_augmented", image_size=24, classes=clean.classes)
        with caplog.at_level("WARNING"):
            chosen = offline_training_items(augmented, clean, range(len(clean)))
        assert len(chosen) == len(augmented) and "do not name a source" in caplog.text
    finally:
        stray.unlink()


def test_stanford_cars_keeps_labels_through_label_prefixed_folders(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="Stanford Cars needs scipy (protopnet[scipy])")
    root = tmp_path / "stanford_cars"
    for folder in ("devkit", "cars_train", "cars_test"):
        (root / folder).mkdir(parents=True)
    names = ["Volvo 240 Sedan 1993", "AM General Hummer SUV 2000", "Acura RL Sedan 2012"]  # not sorted
    scipy_io.savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": np.array([names], dtype=object)})
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")

    def annotations(path: Path, rows: list[tuple]) -> None:
        table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
        for i, row in enumerate(rows):
            table[0, i] = tuple(np.uint16(v) if isinstance(v, int) else v for v in row)
        scipy_io.savemat(str(path), {"annotations": table})

    train = [(5, 4, 30, 25, 1, "00001.jpg"), (1, 1, 20, 20, 3, "00002.jpg"), (3, 3, 18, 28, 2, "00003.jpg")]
    test = [(2, 2, 19, 19, 2, "00001.jpg")]
    annotations(root / "devkit" / "cars_train_annos.mat", train)
    annotations(root / "cars_test_annos_withlabels.mat", test)
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for x1, y1, x2, y2, _, fname in rows:
            array = np.zeros((32, 40, 3), np.uint8)
            array[:] = (0, 0, 255)
            array[y1 - 1 : y2, x1 - 1 : x2] = (255, 0, 0)
            Image.fromarray(array).save(root / folder / fname, format="JPEG", quality=98)
    out = tmp_path / "cars_prepared"
    manifest = prepare_dataset("cars", tmp_path, out, image_size=16, augment=1)
    assert manifest["folders"] == [f"{k}.{n}" for k, n in enumerate(names)]
    loaded = build_dataset(out, split="train", image_size=16)
    assert loaded.classes == manifest["folders"]
    assert {Path(loaded.path(i)).stem: loaded.targets[i] for i in range(len(loaded))} == {"00001": 0, "00002": 2, "00003": 1}
    for path in (out / "train").rglob("*.jpg"):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 60  # cropped to the car's box
    assert len(list((out / "train_augmented").rglob("*.jpg"))) == 9


def test_cli_prepares_prints_a_summary_and_fails_in_one_line(cub, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["-q", "data", "cub200", str(cub), "--out", str(out), "--augment", "1", "--size", "16", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(out), "classes": 3, "train": 6, "test": 3, "train_augmented": 18}
    assert read_manifest(out)["splits"]["train_augmented"]["settings"]["seed"] == 3
    assert main(["-q", "data", "cub200", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("protopnet data: error:") and "images.txt" in err and "bounding_boxes.txt" in err
    assert len(err.splitlines()) == 1
    assert main(["-q", "data", "cub200", str(cub), "--out", str(tmp_path / "y"), "--url", "http://x/y.tgz"]) == 1
    assert "--download" in capsys.readouterr().err
    for argv in (["data", "--help"], ["data", "cub200", "--help"], ["data", "cars", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "example:" in text and "protopnet data " in text
    assert "--url" in text and "cars_test_annos_withlabels.mat" in text


@pytest.mark.shared
@pytest.mark.skipif(not REAL_CUB.is_dir(), reason=f"needs the CUB-200-2011 slice at {REAL_CUB} (../shared)")
def test_real_cub_slice(tmp_path):
    out = tmp_path / "real"
    manifest = prepare_dataset("cub200", REAL_CUB, out, image_size=32, augment=0, classes=1, image_format="png")
    source = CUB200(REAL_CUB, "train", image_size=32, classes=manifest["classes"])
    test = CUB200(REAL_CUB, "test", image_size=32, classes=manifest["classes"])
    assert manifest["classes"] == ["001.Black_footed_Albatross"]
    assert manifest["splits"]["train"]["pictures"] == len(source) and manifest["splits"]["test"]["pictures"] == len(test)
    first = Image.open(out / "train" / manifest["folders"][0] / f"{Path(source.path(0)).stem}.png").convert("RGB")
    assert np.array_equal(np.asarray(first), np.asarray(source.load_image(0)))


def test_training_reads_the_augmented_tree_without_validation_copies(prepared, tmp_path, monkeypatch):
    from protopnet.config import ConfigError, load_config
    from protopnet.train import Trainer, build_run_data

    out, _ = prepared
    overrides = [f"data.root={out}", "data.offline_augmentation=true", "data.augment=false", "data.image_size=24",
                 "data.val_fraction=0.34", "data.batch_size=8", "model.backbone=tiny_cnn", "model.pretrained=false",
                 "model.prototypes_per_class=2", "model.prototype_dim=8", "schedule.epochs=1", "schedule.warm_epochs=1",
                 "schedule.last_layer_iterations=1", "run.device=cpu", "output.save_prototype_images=false"]
    config = load_config(None, overrides)
    data = build_run_data(config, (0.5,) * 3, (0.25,) * 3)
    assert len(data.clean) == 6 and len(data.val_indices) == 3 and len(data.train) == 18
    assert all("train_augmented" in data.train.path(i) for i in data.training_items)
    sources = augmented_sources([data.train.path(i) for i in data.training_items], data.clean.files)
    assert sorted(sources) == sorted(data.train_indices * 3)  # every copy of a training image, nothing else
    epochs = importlib.import_module("protopnet.train.epochs")  # protopnet.train is also a function

    views = []
    real_subset = epochs.IndexedSubset

    def spy(dataset, indices=None, *args, **kwargs):
        views.append((dataset, None if indices is None else list(indices)))
        return real_subset(dataset, indices, *args, **kwargs)

    monkeypatch.setattr(epochs, "IndexedSubset", spy)
    result = Trainer(config, tmp_path / "run", data=data).fit()
    assert (data.train, data.training_items) in views  # the epoch went through the augmented copies
    assert result.test is not None and result.test["n"] == 3
    assert {m["stage"] for m in result.metrics} == {"warm", "push", "last_layer"}

    (tmp_path / "bare" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "bare" / "train" / "a" / "x.png")
    with pytest.raises(ValueError, match="train_augmented.*protopnet data"):
        build_run_data(load_config(None, [*overrides, f"data.root={tmp_path / 'bare'}"]), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ConfigError, match="offline_augmentation"):
        load_config(None, ["data.offline_augmentation=true"])
