"""Interpretability metrics on cases whose answer is known by construction.

The models here are hand-built so that every answer is exact: the backbone is a 4 x 4 average
pool (a 32-pixel picture becomes an 8 x 8 grid of cell colours), the add-on is the identity, and
each prototype is a chosen colour. A prototype set to a class's colour therefore fires exactly on
that class's square (the part); a grey prototype fires on the background.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from protopnet import ProtoPNet
from protopnet.data.base import Annotation
from protopnet.explain.nearest import nearest_patches
from protopnet.explain.html import Report
from protopnet.interpretability import (
    METRICS,
    SCALARS,
    evaluate_interpretability,
    interpretability_html,
    interpretability_sections,
    prototype_localization,
)
from protopnet.interpretability.deletion import DeletionCurves, cell_ids, deletion_counts, deletion_mask, rank_of_cells
from protopnet.interpretability.parts import (
    BOX_PART,
    annotation_points,
    consistency_from_counts,
    covered_parts,
    perturbation,
    region_half_size,
)
from protopnet.regions import upsample_activation
from protopnet.train.push import push_prototypes

from conftest import COLOURS, GREY, ColourDataset, Squares, colour_model, tiny_model

def random_model(seed: int = 0, prototypes_per_class: int = 2, dim: int = 6, prototype_size=(1, 1)) -> ProtoPNet:
    """A random network (one stride-4 convolution and a sigmoid, cheap on a busy CPU) with random
    prototypes: activation maps with no structure planted."""
    model = tiny_model(num_classes=3, prototypes_per_class=prototypes_per_class, prototype_dim=dim, prototype_size=prototype_size, seed=seed)
    model.features = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), nn.Sigmoid())
    model.add_on = nn.Identity()
    return model.eval()


def planted_and_background() -> ProtoPNet:
    """Per class: prototype 2k is the class colour (on the part), 2k + 1 is grey (background)."""
    colours = [c for k in range(3) for c in (COLOURS[k], GREY)]
    return colour_model(colours, [0, 0, 1, 1, 2, 2])


def brute_force_parts(model, dataset, half, noise_seed=None):
    """Per prototype: covered / visible counts per part name and stable counts, one image and
    one prototype at a time with :func:`protopnet.regions.upsample_activation` (the reference's
    loops)."""
    covered, visible, stable, images = {}, {}, {}, {}
    for i in range(len(dataset)):
        x = dataset[i][0][None]
        label = dataset.targets[i]
        points = annotation_points(dataset.annotation(i))
        with torch.no_grad():
            sims = model.similarity(model(x).distances)[0]  # (M, H', W')
            noisy = model.similarity(model(x + perturbation(x.shape[1:], noise_seed, i)).distances)[0] if noise_seed is not None else None

        def parts_of(activation):
            up = upsample_activation(activation.numpy(), (32, 32))
            row, col = np.unravel_index(int(np.argmax(up)), up.shape)
            return {name for name, (px, py) in points.items() if row - half <= math.floor(py) <= row + half and col - half <= math.floor(px) <= col + half}

        for j in range(model.num_prototypes):
            if int(model.prototype_classes[j]) != label:
                continue
            hit = parts_of(sims[j])
            images[j] = images.get(j, 0) + 1
            for name in points:
                visible.setdefault(j, {}).setdefault(name, 0)
                visible[j][name] += 1
                covered.setdefault(j, {}).setdefault(name, 0)
                covered[j][name] += name in hit
            if noisy is not None:
                stable[j] = stable.get(j, 0) + (parts_of(noisy[j]) == hit)
    return covered, visible, stable, images


# -- the rules themselves ---------------------------------------------------------------------

def test_region_size_follows_the_reference():
    assert region_half_size(224) == 36  # Huang et al.: a 72 x 72 region at 224 x 224
    assert region_half_size(32) == 5 and region_half_size(64) == 10 and region_half_size(448) == 72


def test_consistency_rule_by_hand():
    covered = torch.tensor([[4.0, 0.0], [3.0, 5.0], [0.0, 0.0], [4.0, 0.0]])
    visible = torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.0, 0.0], [6.0, 0.0]])
    frequency, consistent = consistency_from_counts(covered, visible, 0.8)
    assert frequency.flatten().tolist() == pytest.approx([0.8, 0.0, 0.6, 1.0, 0.0, 0.0, 4 / 6, 0.0])
    assert consistent.tolist() == [True, True, False, False]  # 0.8 counts, a never-visible part does not
    assert consistency_from_counts(covered, visible, 0.9)[1].tolist() == [False, True, False, False]


def test_covered_parts_borders_truncation_and_visibility():
    peaks = torch.tensor([[10, 10]] * 6)  # (row, col)
    points = torch.tensor([[[15.0, 15.0]], [[15.9, 5.0]], [[16.0, 10.0]], [[10.0, 4.9]], [[10.0, 10.0]], [[5.0, 15.0]]])  # (x, y)
    visible = torch.tensor([[True], [True], [True], [True], [False], [True]])
    assert covered_parts(peaks, points, visible, 5)[:, 0].tolist() == [True, True, False, False, False, True]


def test_annotation_points_from_parts_and_boxes():
    assert annotation_points(Annotation(part_box=[4, 8, 12, 16])) == {BOX_PART: (8.0, 12.0)}
    assert annotation_points(Annotation(parts={"beak": (3, 4)})) == {"beak": (3.0, 4.0)}
    assert annotation_points(Annotation()) == {}


# -- consistency, stability, localisation ------------------------------------------------------

def test_planted_prototype_is_consistent_background_is_not():
    data = Squares(per_class=6)
    result = evaluate_interpretability(planted_and_background(), data, metrics=["consistency", "stability", "localization"], batch_size=8)
    consistency = result["details"]["consistency"]
    assert consistency["consistent"] == [True, False, True, False, True, False]
    assert result["consistency"] == 0.5
    assert consistency["best_part"][0] == BOX_PART and consistency["best_frequency"][0::2] == [1.0, 1.0, 1.0]
    assert all(f < 0.8 for f in consistency["best_frequency"][1::2])
    assert consistency["images_per_prototype"] == [6] * 6
    assert result["parts"] == [BOX_PART]
    # The colour prototypes' peak stays on the square whatever the noise.
    assert result["details"]["stability"]["per_prototype"][0::2] == [1.0, 1.0, 1.0]
    # Each image's most activated own-class prototype is the colour one, on the part.
    assert result["activation_localization"] == 1.0
    assert result["details"]["activation_localization"]["n"] == 18
    assert result["details"]["activation_localization"]["chance"] == pytest.approx(64 / 1024)
    assert "prototype_localization" in result["skipped"]  # never pushed


def test_background_prototypes_are_not_localised():
    model = colour_model([GREY] * 3, [0, 1, 2])
    result = evaluate_interpretability(model, Squares(per_class=6), metrics=["consistency", "localization"])
    assert result["consistency"] == 0.0
    assert result["activation_localization"] < 0.3


def test_counts_match_one_image_at_a_time_with_cub_style_parts():
    data = Squares(per_class=4, cub=True)
    model = random_model(seed=3)
    result = evaluate_interpretability(model, data, metrics=["consistency", "stability"], batch_size=4, seed=11)
    covered, visible, stable, images = brute_force_parts(model, data, region_half_size(32), noise_seed=11)
    names = result["parts"]
    assert sorted(names) == ["head", "tail"]
    details = result["details"]
    for j in range(model.num_prototypes):
        expected = [covered[j][n] / visible[j][n] for n in names]
        assert details["consistency"]["frequencies"][j] == pytest.approx(expected)
        assert details["stability"]["per_prototype"][j] == pytest.approx(stable[j] / images[j])
    # only the images where the tail is visible count for the tail (items 0, 2, 4, ...)
    assert visible[0]["tail"] == 2 and visible[0]["head"] == 4


def test_planted_prototype_consistent_on_cub_style_parts():
    result = evaluate_interpretability(planted_and_background(), Squares(per_class=6, cub=True), metrics=["consistency"])
    consistency = result["details"]["consistency"]
    assert consistency["consistent"][0::2] == [True, True, True]
    assert consistency["best_part"][0::2] == ["head", "head", "head"]


def test_noise_flips_a_tie_between_part_and_decoy():
    """Two identical squares: without noise the peak is the first in row-major order; with noise
    either square wins, so the covered part changes in about half the images."""
    model = colour_model(COLOURS, [0, 1, 2])
    data = Squares(per_class=12, decoy=True)
    noisy = evaluate_interpretability(model, data, metrics=["consistency", "stability"], seed=0)
    assert 0.2 < noisy["stability"] < 0.8
    assert noisy["consistency"] == 0.0  # the part is covered only when it comes first
    quiet = evaluate_interpretability(model, data, metrics=["stability"], noise_std=0.0)
    assert quiet["stability"] == 1.0
    single = evaluate_interpretability(model, Squares(per_class=12), metrics=["stability"], seed=0)
    assert single["stability"] == 1.0


# -- deletion ------------------------------------------------------------------------------------

def test_deletion_gap_positive_when_the_decision_is_the_part():
    model = colour_model(COLOURS, [0, 1, 2])  # each logit = its colour's similarity on the square
    data = Squares(per_class=4)
    result = evaluate_interpretability(model, data, metrics=["deletion"], deletion_steps=8)
    deletion = result["details"]["deletion"]
    assert deletion["grid"] == [8, 8] and deletion["fractions"] == [i / 8 for i in range(9)]
    with torch.no_grad():
        logits = model(torch.stack([data[i][0] for i in range(len(data))])).logits
        blank = model(torch.zeros(1, 3, 32, 32)).logits
    assert deletion["top"][0] == pytest.approx(float(logits.max(dim=1).values.mean()), abs=1e-5)
    assert deletion["random"][0] == deletion["top"][0]
    assert deletion["top"][-1] == deletion["random"][-1] == pytest.approx(float(blank[0, logits.argmax(1)].mean()), abs=1e-5)
    # masking the 8 most activated cells removes the 2 x 2 cells of the square: the logit is gone
    assert deletion["top"][1] < 0.01 * deletion["top"][0]
    assert deletion["random"][1] > 0.9 * deletion["top"][0]
    assert result["deletion_gap"] > 3 and deletion["positive_fraction"] == 1.0
    expected_gap = np.trapezoid(np.subtract(deletion["random"], deletion["top"]), deletion["fractions"])
    assert result["deletion_gap"] == pytest.approx(expected_gap, rel=1e-5)


def test_deletion_gap_zero_when_the_logits_ignore_the_image():
    model = colour_model(COLOURS, [0, 1, 2])
    with torch.no_grad():
        model.last_layer.weight.zero_()
    result = evaluate_interpretability(model, Squares(per_class=2), metrics=["deletion"], deletion_steps=4)
    assert result["deletion_gap"] == 0.0
    assert result["details"]["deletion"]["positive_fraction"] == 0.0


def test_deletion_masks_cover_equal_areas():
    ids = cell_ids(32, (8, 8))
    assert torch.bincount(ids.flatten()).tolist() == [16] * 64  # a partition into equal cells
    assert ids[0, 0] == 0 and ids[0, 31] == 7 and ids[31, 0] == 56 and ids[5, 9] == 1 * 8 + 2
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(64, generator=generator) for _ in range(3)] + [torch.arange(64)])
    ranks = rank_of_cells(orders)
    assert torch.equal(torch.gather(ranks, 1, orders), torch.arange(64).expand(4, 64))
    for count in deletion_counts(64, 10):
        mask = deletion_mask(ranks, ids, count)
        assert mask.flatten(1).sum(1).tolist() == [16 * count] * 4
    assert deletion_counts(64, 10) == [0, 6, 13, 19, 26, 32, 38, 45, 51, 58, 64]
    assert deletion_counts(4, 10) == [0, 1, 2, 3, 4]
    assert DeletionCurves(32, (2, 2), steps=10).fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    # the default grid is the latent grid (8 x 8 here), also for 2 x 2 prototypes (7 x 7 positions)
    result = evaluate_interpretability(random_model(prototype_size=(2, 2)), Squares(per_class=1), metrics=["deletion"], deletion_steps=2)
    assert result["details"]["deletion"]["grid"] == [8, 8]


# -- purity, duplicates, prototype localisation ----------------------------------------------

def test_purity_of_colour_prototypes():
    model = planted_and_background()
    train = Squares(per_class=5, seed=1)
    result = evaluate_interpretability(model, Squares(per_class=2), train_dataset=train, metrics=["purity"], k=4)
    purity = result["details"]["purity"]
    assert purity["per_prototype"][0::2] == [1.0, 1.0, 1.0]  # a class colour's nearest patches are its squares
    expected = nearest_patches(model, train, 4, keep_activations=False).purity()
    assert purity["per_prototype"] == pytest.approx(expected.tolist())
    assert result["purity"] == pytest.approx(float(expected.mean()))
    assert purity["split"] == "train" and purity["k"] == 4 and purity["chance"] == pytest.approx(1 / 3)


def test_duplicates_and_localisation_after_push():
    # two identical colour prototypes per class: push sends both to the same patch
    model = colour_model([c for c in COLOURS for _ in range(2)], [0, 0, 1, 1, 2, 2])
    train = Squares(per_class=4, seed=2)
    push_prototypes(model, train, batch_size=5)
    result = evaluate_interpretability(model, Squares(per_class=2), train_dataset=train, metrics=["duplicates", "localization"])
    duplicates = result["details"]["duplicates"]
    assert result["duplicates"] == 3 and duplicates["groups"] == [[0, 1], [2, 3], [4, 5]]
    assert duplicates["duplicate_of"] == [None, 0, None, 2, None, 4] and duplicates["cross_class_groups"] == 0
    assert duplicates["method"].startswith("provenance")
    assert result["prototype_localization"] == 1.0 == prototype_localization(model, train)["localization"]
    # distinct source patches: no duplicates
    for j, entry in enumerate(model.provenance):
        entry["position"] = [j, 0]
    assert evaluate_interpretability(model, Squares(per_class=1), metrics=["duplicates"])["duplicates"] == 0
    # the provenance names other images than the dataset given: localisation is skipped, not wrong
    skipped = evaluate_interpretability(model, Squares(per_class=4, seed=9), metrics=["localization"])
    assert skipped["prototype_localization"] is None and "not the one" in skipped["skipped"]["prototype_localization"]


def test_duplicates_without_provenance_compare_vectors():
    model = colour_model([COLOURS[0], GREY, COLOURS[1], GREY, COLOURS[2], GREY], [0, 0, 1, 1, 2, 2])
    result = evaluate_interpretability(model, Squares(per_class=1), metrics=["duplicates"])
    assert result["duplicates"] == 2 and result["details"]["duplicates"]["groups"] == [[1, 3, 5]]
    assert result["details"]["duplicates"]["cross_class_groups"] == 1


# -- streaming, results, reports, CLI ---------------------------------------------------------

def test_results_do_not_depend_on_batching_and_are_json():
    model = random_model(seed=1)
    data = ColourDataset(per_class=3)
    one = evaluate_interpretability(model, data, batch_size=1, deletion_steps=2, k=3)
    many = evaluate_interpretability(model, data, batch_size=4, deletion_steps=2, k=3)
    json.dumps(one, allow_nan=False)
    for name in SCALARS:
        assert one[name] == pytest.approx(many[name], abs=1e-5), name
    for name in ("consistency", "stability", "purity", "duplicates"):
        assert one["details"][name] == many["details"][name]
    assert one["details"]["deletion"]["top"] == pytest.approx(many["details"]["deletion"]["top"], abs=1e-5)
    assert one["details"]["deletion"]["random"] == pytest.approx(many["details"]["deletion"]["random"], abs=1e-5)
    assert one["n_images"] == 9 and one["n_prototypes"] == 6
    assert set(one["definitions"]) == set(SCALARS)
    assert model.training is False


def test_without_part_annotations_part_metrics_are_skipped():
    class Plain(ColourDataset):
        def annotation(self, index):
            return Annotation()

    model = random_model().train()
    result = evaluate_interpretability(model, Plain(per_class=2), metrics=["consistency", "stability", "localization", "deletion"], deletion_steps=2)
    assert result["consistency"] is None and result["stability"] is None and result["activation_localization"] is None
    assert "no part annotations" in result["skipped"]["consistency"]
    assert result["deletion_gap"] is not None
    assert model.training  # the training flag is restored
    with pytest.raises(ValueError, match="unknown interpretability metric"):
        evaluate_interpretability(model, Plain(), metrics=["accuracy"])


def test_ensemble_part_figures_are_its_members():
    from protopnet.ensemble import Ensemble

    planted, grey = colour_model(COLOURS, [0, 1, 2]), colour_model([GREY] * 3, [0, 1, 2])
    data = Squares(per_class=3)
    both = evaluate_interpretability(Ensemble([planted, grey]), data, metrics=["consistency", "deletion", "purity"], deletion_steps=2)
    alone = [evaluate_interpretability(m, data, metrics=["consistency"]) for m in (planted, grey)]
    assert both["details"]["consistency"]["consistent"] == sum((r["details"]["consistency"]["consistent"] for r in alone), [])
    assert both["deletion_gap"] is not None and "purity" in both["skipped"]


def test_html_sections_escape_everything():
    model = planted_and_background()
    model.class_names = ["<script>alert(1)</script>", "a & b", 'say "hi"']
    result = evaluate_interpretability(model, Squares(per_class=2), metrics=METRICS, deletion_steps=2, k=2)
    result["parts"] = ["<b>wing</b>"]
    sections = interpretability_sections(result)
    assert [s.title for s in sections] == ["Interpretability metrics", "Deletion curves", "Interpretability per prototype"]
    assert len(sections[2].rows) == 6 and len(interpretability_sections(result, max_prototypes=2)[2].rows) == 2
    page = interpretability_html(result)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;wing&lt;/b&gt;" in page and "a &amp; b" in page and "say &quot;hi&quot;" in page
    report = Report("Model")
    for section in sections:
        report.add(section)
    assert "Deletion gap" in report.render()


def test_cli_evaluate_interpretability(tmp_path, capsys, monkeypatch):
    import protopnet.cli.evaluate as cli_evaluate
    from protopnet.checkpoint import save_model
    from protopnet.cli import main
    from protopnet.data.synthetic import SyntheticParts

    # The CLI's own code path, on 4 synthetic pictures per class instead of 30 / 100 (CPU time).
    real = cli_evaluate.dataset_for_model
    monkeypatch.setattr(cli_evaluate, "dataset_for_model", lambda model, spec, split, **kw: real(model, spec, split, images_per_class=3, **kw))

    model = tiny_model(num_classes=3, prototypes_per_class=2, seed=0)
    model.mean, model.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = SyntheticParts("train", num_classes=3, images_per_class=3, image_size=32, mean=model.mean, std=model.std)
    push_prototypes(model, train, batch_size=12)
    save_model(model, tmp_path / "model")
    out = tmp_path / "eval.json"
    code = main(["-q", "evaluate", str(tmp_path / "model"), "--data", "synthetic", "--interpretability", "--json", str(out), "--batch-size", "32", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    figures = json.loads(out.read_text())["interpretability"]
    for name in ("consistency", "stability", "prototype_localization", "activation_localization", "purity"):
        assert 0.0 <= figures[name] <= 1.0, name
    assert figures["n_images"] == 9 and figures["details"]["purity"]["split"] == "train"
    assert figures["details"]["deletion"]["n"] == 9 and isinstance(figures["duplicates"], int)
    assert f"consistency: {figures['consistency']:.4f}" in printed and "deletion_gap:" in printed


def test_cli_evaluate_interpretability_takes_a_list_of_metrics(tmp_path, capsys, monkeypatch):
    import protopnet.cli.evaluate as cli_evaluate
    from protopnet.checkpoint import save_model
    from protopnet.cli import main

    real = cli_evaluate.dataset_for_model
    asked = []

    def small(model, spec, split, **kw):
        asked.append(split)
        return real(model, spec, split, images_per_class=3, **kw)

    monkeypatch.setattr(cli_evaluate, "dataset_for_model", small)
    model = tiny_model(num_classes=3, prototypes_per_class=2, seed=0)
    model.mean, model.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_model(model, tmp_path / "model")
    out = tmp_path / "eval.json"
    argv = ["-q", "evaluate", str(tmp_path / "model"), "--data", "synthetic", "--json", str(out), "--device", "cpu", "--interpretability"]
    assert main(argv + [" stability, consistency,stability"]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())["interpretability"]
    for name in ("consistency", "stability", "consistency_fixed_cell", "consistency_random_peak"):
        assert 0.0 <= figures[name] <= 1.0, name
        assert f"{name}: {figures[name]:.4f}" in printed
    for name in ("prototype_localization", "activation_localization", "deletion_gap", "purity", "duplicates"):
        assert figures[name] is None, name
    assert "deletion" not in figures["details"] and "purity" not in figures["details"]
    assert asked == ["test"]  # neither purity nor localisation: the training split is not read

    # a name that is not a metric: one line naming it and every allowed name, before the model is read
    assert main(["-q", "evaluate", str(tmp_path / "absent"), "--data", "synthetic", "--interpretability", "consistency,acuracy"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'acuracy'" in error and "consistency" in error
    assert all(name in error for name in METRICS)
    assert main(["-q", "evaluate", str(tmp_path / "model"), "--data", "synthetic", "--interpretability", ","]) == 1
    assert "names no metric" in capsys.readouterr().err


def test_interpretability_option_parsing():
    import argparse

    from protopnet.cli.common import CommandError, add_interpretability_argument, interpretability_metrics

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_interpretability_argument(parser, "measure")
    read = lambda *argv: interpretability_metrics(parser.parse_args(list(argv)).interpretability)  # noqa: E731
    assert read("m") is None
    assert read("m", "--interpretability") == tuple(METRICS) == read("m", "--interpretability", "all")
    assert read("m", "--interpretability", "purity,deletion,purity") == ("purity", "deletion")
    assert read("m", "--interpretability=consistency") == ("consistency",)
    with pytest.raises(CommandError, match=r"unknown metric 'runs/model' \(a path\?"):
        read("--interpretability", "runs/model", "m")
    with pytest.raises(CommandError, match="unknown metric 'Consistency'; choose from consistency, stability, localization"):
        read("m", "--interpretability", "Consistency")


def test_cli_analyze_shares_the_metrics_option(tmp_path, capsys):
    from protopnet.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["analyze", "model", "--data", "synthetic", "--out", "x", "--interpretability", "consistency"])
    assert args.interpretability == "consistency"
    from protopnet.cli import main

    assert main(["-q", "analyze", str(tmp_path / "absent"), "--data", "synthetic", "--out", str(tmp_path / "a"), "--interpretability", "purity,nope"]) == 1
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_localisation_before_pruning_counts_the_pruned_prototypes():
    from protopnet.prune import prune

    # a colour prototype and a grey (background) one per class: pruning removes the grey ones
    model = colour_model([c for colour in COLOURS for c in (colour, GREY)], [0, 0, 1, 1, 2, 2])
    train = Squares(per_class=4, seed=2)
    push_prototypes(model, train, batch_size=5)
    before = prototype_localization(model, train)
    report = prune(model, train, k=4, threshold=3, refit=False)
    assert report.removed == [1, 3, 5]
    after = prototype_localization(model, train)
    assert after["n"] == 3 and after["localization"] == 1.0
    counted = prototype_localization(model, train, before_pruning=True)
    assert counted["n"] == 6 and counted["localization"] == pytest.approx(before["localization"])
    assert counted["per_prototype"][:3] == after["per_prototype"]


# -- consistency reference points: a fixed cell and a random peak ------------------------------

class FixedSquares(Squares):
    """Squares whose class square (the part) is always at the same place, (x, y) = (12, 8)."""

    def squares(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (12, 8), (0, 0)


def brute_force_cell_peaks(grid, size):
    """Each one-hot activation map's region centre, one map at a time with
    :func:`protopnet.regions.upsample_activation` and numpy's argmax (not the batched code)."""
    h, w = grid
    peaks = []
    for g in range(h * w):
        onehot = np.zeros((h, w), dtype=np.float32)
        onehot.flat[g] = 1.0
        up = upsample_activation(onehot, (size, size))
        peaks.append(np.unravel_index(int(np.argmax(up)), up.shape))
    return peaks


def brute_force_cell_coverage(dataset, classes, grid, half):
    """Per class: for each picture, the parts visible and, per cell, the set of parts its region covers."""
    peaks = brute_force_cell_peaks(grid, dataset.image_size)
    per_class = {c: [] for c in set(classes)}
    for i in range(len(dataset)):
        label = dataset.targets[i]
        if label not in per_class:
            continue
        points = annotation_points(dataset.annotation(i))
        cells = [{n for n, (px, py) in points.items() if abs(math.floor(py) - r) <= half and abs(math.floor(px) - c) <= half} for r, c in peaks]
        per_class[label].append((set(points), cells))
    return per_class


def brute_force_fixed_cells(dataset, classes, grid, half, threshold):
    """Per cell: the fraction of prototypes whose class's pictures have some part covered by the
    region at that cell in at least ``threshold`` of the pictures where it is visible."""
    coverage = brute_force_cell_coverage(dataset, classes, grid, half)
    scores = []
    for g in range(grid[0] * grid[1]):
        consistent = {}
        for c, pictures in coverage.items():
            names = set().union(*(seen for seen, _ in pictures))
            freq = [sum(n in cells[g] for seen, cells in pictures if n in seen) / sum(n in seen for seen, _ in pictures) for n in names]
            consistent[c] = any(f >= threshold for f in freq)
        scores.append(sum(consistent[c] for c in classes) / len(classes))
    return scores


def binomial_tail(n, p, k):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_fixed_cell_peaks_are_the_one_hot_maps_peaks():
    from protopnet.interpretability.baselines import fixed_peaks

    for grid, size in (((8, 8), 32), ((7, 7), 224), ((4, 4), 40)):
        assert [tuple(p) for p in fixed_peaks(grid, size).tolist()] == [tuple(int(v) for v in p) for p in brute_force_cell_peaks(grid, size)]


def test_a_part_at_a_fixed_place_is_found_by_a_fixed_cell():
    """The part is always at the same place: a detector that always peaks on it is perfectly
    consistent, so the floor is 1.0, and the grey prototypes' real consistency does not beat it."""
    data = FixedSquares(per_class=5)
    model = planted_and_background()
    result = evaluate_interpretability(model, data, metrics=["consistency"], baseline_draws=200)
    baselines = result["details"]["consistency_baselines"]
    assert result["consistency_fixed_cell"] == 1.0 and baselines["fixed_cell"]["per_class_best"] == 1.0
    # the chosen cell's region covers the part's centre (16, 12) = (x, y)
    row, col = baselines["fixed_cell"]["peak_pixel"]
    assert abs(12 - row) <= 5 and abs(16 - col) <= 5
    assert baselines["grid"] == [8, 8] and baselines["evaluated_prototypes"] == 6
    expected = brute_force_fixed_cells(data, model.prototype_classes.tolist(), (8, 8), region_half_size(32), 0.8)
    assert sum(baselines["fixed_cell"]["per_cell"], []) == pytest.approx(expected)
    assert result["consistency"] == 0.5 < result["consistency_fixed_cell"]


def test_random_peak_matches_the_binomial_tail():
    """One part, always at the same place: a random peak covers it with probability p = (cells
    whose region covers it) / 64 in each picture, independently, so a prototype is consistent
    with probability P(Binomial(n, p) >= ceil(threshold * n)). The sampled estimate must agree."""
    data = FixedSquares(per_class=8)
    model = colour_model(COLOURS, [0, 1, 2])
    half = region_half_size(32)
    peaks = brute_force_cell_peaks((8, 8), 32)
    p = sum(abs(12 - r) <= half and abs(16 - c) <= half for r, c in peaks) / 64
    assert 0.05 < p < 0.3  # about region area / picture area: 11 x 11 / 32 x 32 = 0.118
    for threshold in (0.125, 0.25, 0.8):
        result = evaluate_interpretability(model, data, metrics=["consistency"], threshold=threshold, baseline_draws=4000, seed=3)
        random_peak = result["details"]["consistency_baselines"]["random_peak"]
        exact = binomial_tail(8, p, math.ceil(threshold * 8 - 1e-9))
        assert random_peak["score"] == pytest.approx(exact, abs=4 * max(random_peak["standard_error"], 0.002))
        assert random_peak["expected_best_frequency"] == pytest.approx(p)
        assert result["consistency"] == 1.0  # the colour prototypes are on the part in every picture
    assert 0.3 < evaluate_interpretability(model, data, metrics=["consistency"], threshold=0.125, baseline_draws=100)["consistency_random_peak"] < 0.95


def test_a_detector_on_the_part_beats_the_fixed_cell_with_cub_style_parts():
    """The square moves: no fixed cell follows it, the class-colour prototype does. The per-cell
    figures match a one-picture-at-a-time count with visibility (the tail is visible in every
    other picture only)."""
    data = Squares(per_class=6, cub=True)
    model = colour_model(COLOURS, [0, 1, 2])
    result = evaluate_interpretability(model, data, metrics=["consistency"], baseline_draws=500)
    assert result["consistency"] == 1.0
    assert result["consistency_fixed_cell"] < 1.0 and result["consistency_random_peak"] < 0.5
    baselines = result["details"]["consistency_baselines"]
    for threshold in (0.8, 0.3):
        expected = brute_force_fixed_cells(data, [0, 1, 2], (8, 8), region_half_size(32), threshold)
        got = evaluate_interpretability(model, data, metrics=["consistency"], threshold=threshold, baseline_draws=10)
        per_cell = got["details"]["consistency_baselines"]["fixed_cell"]["per_cell"]
        assert sum(per_cell, []) == pytest.approx(expected)
        assert got["consistency_fixed_cell"] == pytest.approx(max(expected))
        assert got["consistency_fixed_cell_mean"] == pytest.approx(sum(expected) / len(expected))
        assert got["details"]["consistency_baselines"]["fixed_cell"]["cell"] == list(divmod(expected.index(max(expected)), 8))
    loose = brute_force_fixed_cells(data, [0, 1, 2], (8, 8), region_half_size(32), 0.3)
    assert min(loose) == 0 and 0 < sorted(loose)[-2]  # the per-cell check above is not vacuous
    assert baselines["random_peak"]["draws"] == 500


def test_baselines_do_not_depend_on_batching_and_follow_the_seed():
    data = Squares(per_class=4, cub=True)
    model = random_model(seed=2)
    one = evaluate_interpretability(model, data, metrics=["consistency"], batch_size=1, threshold=0.3, baseline_draws=50, seed=5)
    many = evaluate_interpretability(model, data, metrics=["consistency"], batch_size=7, threshold=0.3, baseline_draws=50, seed=5)
    assert one["details"]["consistency_baselines"] == many["details"]["consistency_baselines"]
    other = evaluate_interpretability(model, data, metrics=["consistency"], batch_size=7, threshold=0.3, baseline_draws=50, seed=6)
    assert other["details"]["consistency_baselines"]["fixed_cell"] == one["details"]["consistency_baselines"]["fixed_cell"]
    # only consistency asks for them
    only_stability = evaluate_interpretability(model, data, metrics=["stability"])
    assert only_stability["consistency_fixed_cell"] is None and "consistency_baselines" not in only_stability["details"]


def test_figures_over_distinct_prototypes_count_each_group_of_copies_once():
    model = random_model(seed=2)  # a model whose prototypes differ in both figures
    train = Squares(per_class=3, seed=2)
    push_prototypes(model, train, batch_size=5)
    for j in (1, 3):  # prototypes 1 and 3 claim prototype 0's source patch
        model.provenance[j] = dict(model.provenance[0])
    result = evaluate_interpretability(model, ColourDataset(per_class=3), metrics=["consistency", "stability", "duplicates"])
    assert result["details"]["duplicates"]["duplicate_of"] == [None, 0, None, 0, None, None]
    distinct = [0, 2, 4, 5]
    consistent = result["details"]["consistency"]["consistent"]
    stable = result["details"]["stability"]["per_prototype"]
    assert result["consistency_distinct"] == pytest.approx(sum(float(consistent[j]) for j in distinct) / 4)
    assert result["stability_distinct"] == pytest.approx(sum(stable[j] for j in distinct) / 4)
    # the copies' figures are really left out
    assert result["consistency_distinct"] != pytest.approx(result["consistency"])
    assert result["stability_distinct"] != pytest.approx(result["stability"])
    # without the duplicates metric there is nothing to count once
    plain = evaluate_interpretability(model, ColourDataset(per_class=3), metrics=["consistency", "stability"])
    assert plain["consistency_distinct"] is None and plain["stability_distinct"] is None
