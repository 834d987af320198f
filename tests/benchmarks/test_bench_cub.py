"""benchmarks/bench_cub.py: both models train and write their table and JSON; the linear baseline
follows the schedule, the feature cache and weight averaging as the Trainer does; the
interpretability report measures each ProtoPNet, per seed and over seeds."""

from __future__ import annotations

import json

import pytest
import torch

from protopnet.config import load_config
from protopnet.train.stages import backbone_blocks

from conftest import COLOURS, GREY, ROOT, Squares, colour_model, load_benchmark, make_cub, moving_average, record_trajectory

CONFIGS = ROOT / "configs"


def _bench_module():
    return load_benchmark("bench_cub")


def test_bench_cub_trains_both_models_and_writes_table_and_json(tmp_path, capsys):
    import json


    bench = _bench_module()
    src = make_cub(tmp_path / "CUB_200_2011", per_class_train=4, per_class_test=2)
    out = tmp_path / "bench"
    tiny = ["model.backbone=tiny_cnn", "model.pretrained=false", "model.prototypes_per_class=2", "model.prototype_dim=8",
            "data.batch_size=4", "schedule.last_layer_iterations=2", "output.save_prototype_images=false"]
    assert bench.main(["--data", str(src), "--out", str(out), "--epochs", "2", "--image-size", "32", "--threads", "1",
                       "--weights", "", "--quiet", *tiny]) == 0
    table = capsys.readouterr().out
    assert "| model | top-1 | top-5 | wall time |" in table and "ProtoPNet (tiny_cnn, 6 prototypes)" in table and "Linear head" in table
    record = json.loads((out / "bench_cub.json").read_text())
    assert (record["classes"], record["train_images"], record["test_images"], record["image_size"]) == (3, 12, 6, 32)
    for name in ("protopnet", "baseline"):
        result = record["results"][name]
        assert result["test_fp32"]["n"] == 6 and 0 <= result["test_fp32"]["top1"] <= result["test_fp32"]["top5"] <= 1
        assert [s["stage"] for s in result["steps"]] == ["warm", "joint", "push", "last_layer"]
    assert record["targets"]["gap_points"] == pytest.approx(
        100 * (record["results"]["protopnet"]["test_fp32"]["top1"] - record["results"]["baseline"]["test_fp32"]["top1"]), abs=0.01)
    assert (out / "protopnet" / "results.json").is_file() and (out / "cache").is_dir()


def _small_bench_setup(tmp_path, *overrides):
    """The benchmark module, and a 3-epoch config and its data on a 3-class CUB tree (12 training
    pictures, batches of 4, tiny_cnn at 32 px)."""

    from protopnet.train import build_run_data
    from protopnet.train.run_data import backbone_normalisation

    src = make_cub(tmp_path / "CUB_200_2011", per_class_train=4, per_class_test=1)
    config = load_config(None, [f"data.root={src}", "model.backbone=tiny_cnn", "model.pretrained=false", "data.image_size=32",
                                "data.batch_size=4", "schedule.epochs=3", "schedule.warm_epochs=1", "schedule.push_start=3",
                                "schedule.last_layer_iterations=2", "run.device=cpu", f"output.dir={tmp_path / 'run'}", *overrides])
    return _bench_module(), config, build_run_data(config, *backbone_normalisation(config))


def test_bench_baseline_follows_the_schedule_and_keeps_frozen_blocks(tmp_path):
    bench, config, data = _small_bench_setup(tmp_path, "schedule.frozen_backbone_blocks=4")
    torch.manual_seed(config.run.seed)
    initial = bench.LinearBaseline("tiny_cnn", 3, pretrained=False)  # the same init train_baseline makes
    model, steps = bench.train_baseline(config, data)
    assert [s["stage"] for s in steps] == ["warm", "joint", "joint", "push", "last_layer"]
    before, after = backbone_blocks(initial.features), backbone_blocks(model.features)
    conv = [i for i, b in enumerate(after) if isinstance(b, torch.nn.Conv2d)]
    assert all(torch.equal(before[i].weight, after[i].weight) for i in conv if i < 4)  # frozen blocks untouched
    assert any(not torch.equal(before[i].weight, after[i].weight) for i in conv if i >= 4)  # the rest trained
    assert not torch.equal(initial.head.weight, model.head.weight)


def test_bench_baseline_trains_the_same_on_the_feature_cache(tmp_path, monkeypatch):
    """The baseline caches the frozen blocks once (warm-up, joint and last layer read them) and
    ends with the weights it reaches from the pictures."""

    from protopnet.data import CUB200
    from protopnet.train import build_run_data
    from protopnet.train.run_data import backbone_normalisation

    bench = _bench_module()
    src = make_cub(tmp_path / "CUB_200_2011", per_class_train=4, per_class_test=1)
    weights, losses = [], []
    for cached in (False, True):
        config = load_config(None, [f"data.root={src}", "model.backbone=tiny_cnn_gn", "model.pretrained=false", "data.image_size=32",
                                    "data.batch_size=4", "data.augment=true", "data.augment_views=2", f"data.feature_cache={str(cached).lower()}",
                                    "data.cache=false", "schedule.epochs=3", "schedule.warm_epochs=1", "schedule.push_start=3",
                                    "schedule.last_layer_iterations=2", "schedule.frozen_backbone_blocks=2", "run.device=cpu",
                                    f"output.dir={tmp_path / 'run'}"])
        data = build_run_data(config, *backbone_normalisation(config))
        loads = []
        original = CUB200.load_image
        monkeypatch.setattr(CUB200, "load_image", lambda self, i: (loads.append(i), original(self, i))[1])
        model, steps = bench.train_baseline(config, data)
        monkeypatch.setattr(CUB200, "load_image", original)
        if cached:  # each training view made once, for the frozen blocks' cache (and none for the last layer),
            # from its base picture, decoded once for both its views (kept in memory: data.memory_cache_max_gb)
            assert sorted(loads) == sorted({i // 2 for i in data.training_items})
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        losses.append([s.get("loss") for s in steps])
    assert [s["stage"] for s in steps] == ["warm", "joint", "joint", "push", "last_layer"]
    assert losses[0][:3] == pytest.approx(losses[1][:3], rel=1e-5)  # the same batches in the same order
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-4, rtol=1e-4), k


def test_bench_baseline_averages_its_weights_as_the_trainer_does(tmp_path, monkeypatch):
    """With optim.ema_decay the baseline's backbone ends as the moving average of its training
    weights (the last-layer stage then trains the head alone), as ProtoPNet's does."""

    bench, config, data = _small_bench_setup(tmp_path, "optim.ema_decay=0.7")
    built: list[torch.nn.Module] = []  # the benchmark builds its model itself: keep a handle on it
    original = bench.LinearBaseline.__init__
    monkeypatch.setattr(bench.LinearBaseline, "__init__", lambda self, *a, **k: (original(self, *a, **k), built.append(self))[0])
    snapshots, handle = record_trajectory(_LastBuilt(built))
    try:
        model, steps = bench.train_baseline(config, data)
    finally:
        handle.remove()
    training_steps = 3 * 3  # 3 epochs of 3 batches (12 pictures, batch 4), then 2 passes of the last layer
    assert len(snapshots) == training_steps + 2 * 3
    expected = moving_average(snapshots[:training_steps], 0.7)
    names = [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, model.parameters(), expected):
        if name.startswith("features"):
            assert torch.allclose(got, want, atol=1e-6), name
    head = names.index("head.weight")
    assert not torch.allclose(expected[head], snapshots[training_steps - 1][head], atol=1e-5)  # the average is not the last weights


class _LastBuilt:
    """The parameters of the last model in a list (empty until one is built)."""

    def __init__(self, built: list) -> None:
        self.built = built

    def parameters(self):
        return self.built[-1].parameters() if self.built else iter(())


def test_measure_protopnet_reports_consistency_and_its_reference_points():
    bench = _bench_module()
    test, train = Squares(per_class=6, cub=True), Squares(per_class=5, seed=1)  # k = 5 nearest patches
    planted = bench.measure_protopnet(colour_model(COLOURS, [0, 1, 2]), test, train, batch_size=8)
    assert planted["consistency"] == 1.0 and planted["stability"] == 1.0 and planted["purity"] == 1.0
    # the square moves: no fixed cell follows it as the class-colour prototypes do
    assert planted["consistency_fixed_cell"] < 1.0 and planted["consistency_random_peak"] < 0.5
    assert len(planted["fixed_cell"]) == 2 and planted["random_peak_standard_error"] is not None and planted["skipped"] == {}
    grey = bench.measure_protopnet(colour_model([GREY] * 3, [0, 1, 2]), test, train, batch_size=8)
    assert grey["consistency"] == 0.0 and grey["purity"] < 1.0
    # the reference points are properties of the pictures and the grid, not of the prototypes
    assert grey["consistency_fixed_cell"] == planted["consistency_fixed_cell"]
    assert grey["consistency_random_peak"] == planted["consistency_random_peak"]


def test_protopnet_table_per_seed_mean_and_spread():
    bench = _bench_module()
    runs = [
        {"seed": 0, "results": {"protopnet": {"test_fp32": {"top1": 0.5}, "seconds": 30.0, "interpretability": {
            "consistency": 0.25, "consistency_fixed_cell": 0.1, "consistency_random_peak": 0.0, "stability": 0.5, "purity": None,
            "duplicates": 3, "consistency_distinct": 0.5, "stability_distinct": 0.25}}}},
        {"seed": 7, "results": {"protopnet": {"test_fp32": {"top1": 0.75}, "seconds": 90.0, "interpretability": {
            "consistency": 0.75, "consistency_fixed_cell": 0.1, "consistency_random_peak": 0.0, "stability": 0.7, "purity": None,
            "duplicates": 0, "consistency_distinct": 0.75, "stability_distinct": 0.7}},
            "baseline": {"test_fp32": {"top1": 0.9}}}},
    ]
    rows = bench.protopnet_rows(runs)
    assert [r["seed"] for r in rows] == [0, 7] and rows[1]["top1"] == 0.75 and rows[1]["seconds"] == 90.0
    table, summary = bench.protopnet_table(rows)
    lines = table.splitlines()
    assert lines[0] == ("| ProtoPNet | top-1 | consistency | fixed cell | random peak | stability | purity | duplicates "
                        "| consistency (distinct) | stability (distinct) | wall time |")
    assert lines[2] == "| seed 0 | 50.0 % | 25.0 % | 10.0 % | 0.0 % | 50.0 % | n/a | 3 | 50.0 % | 25.0 % | 30.0 s |"
    assert lines[4] == "| mean | 62.5 % | 50.0 % | 10.0 % | 0.0 % | 60.0 % | n/a | 1.5 | 62.5 % | 47.5 % | 1 min 00.0 s |"
    # sample sd: |a - b| / sqrt(2)
    assert lines[5] == "| sd | 17.7 % | 35.4 % | 0.0 % | 0.0 % | 14.1 % | n/a | 2.1 | 17.7 % | 31.8 % | 42.4 s |"
    assert summary["consistency"] == {"n": 2, "mean": 0.5, "sd": pytest.approx(0.5 / 2**0.5), "min": 0.25, "max": 0.75}
    assert summary["purity"]["n"] == 0 and summary["purity"]["mean"] is None
    one_table, one = bench.protopnet_table(rows[:1])
    assert len(one_table.splitlines()) == 3 and one["top1"]["sd"] is None  # one seed: no mean and sd rows


def add_parts(root):
    """CUB part files for a make_cub tree: 'belly' at each picture's box centre (visible) and
    'tail' at its top-left corner (visible in every other picture)."""
    ids = [line.split()[0] for line in (root / "images.txt").read_text().split("\n") if line.strip()]
    boxes = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in (root / "bounding_boxes.txt").read_text().split("\n") if line.strip()}
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 belly\n2 tail\n")
    rows = []
    for n, image_id in enumerate(ids):
        x, y, w, h = boxes[image_id]
        rows += [f"{image_id} 1 {x + w / 2} {y + h / 2} 1", f"{image_id} 2 {x} {y} {n % 2}"]
    (root / "parts" / "part_locs.txt").write_text("\n".join(rows) + "\n")


def test_bench_cub_two_seeds_prints_interpretability_per_seed_and_over_seeds(tmp_path, capsys):

    bench = _bench_module()
    src = make_cub(tmp_path / "CUB_200_2011", per_class_train=4, per_class_test=2)
    add_parts(src)
    out = tmp_path / "bench"
    tiny = ["model.backbone=tiny_cnn", "model.pretrained=false", "model.prototypes_per_class=2", "model.prototype_dim=8",
            "data.batch_size=4", "schedule.last_layer_iterations=2", "output.save_prototype_images=false"]
    assert bench.main(["--data", str(src), "--out", str(out), "--epochs", "2", "--image-size", "32", "--threads", "1",
                       "--weights", "", "--quiet", "--models", "protopnet", "--seeds", "0", "1", *tiny]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "bench_cub.json").read_text())
    assert record["seeds"] == [0, 1] and [run["seed"] for run in record["runs"]] == [0, 1]
    assert (out / "protopnet-seed0" / "results.json").is_file() and (out / "protopnet-seed1" / "results.json").is_file()
    figures = [run["results"]["protopnet"]["interpretability"] for run in record["runs"]]
    for f in figures:
        for name in ("consistency", "consistency_fixed_cell", "consistency_random_peak", "stability", "purity"):
            assert 0.0 <= f[name] <= 1.0, name
        assert f["skipped"] == {}
    # the reference points depend on the test pictures only, so they agree across seeds
    assert figures[0]["consistency_fixed_cell"] == figures[1]["consistency_fixed_cell"]
    summary = record["protopnet_summary"]
    assert summary["consistency"]["mean"] == pytest.approx((figures[0]["consistency"] + figures[1]["consistency"]) / 2)
    tops = [run["results"]["protopnet"]["test_fp32"]["top1"] for run in record["runs"]]
    assert record["top1"]["protopnet"]["mean"] == pytest.approx(sum(tops) / 2)
    assert "ProtoPNet (tiny_cnn, 6 prototypes), seed 1 |" in printed
    for f in figures:  # each group of copies counted once: the distinct figures are means over fewer prototypes
        assert 0 <= f["duplicates"] < 6 and 0.0 <= f["consistency_distinct"] <= 1.0 and 0.0 <= f["stability_distinct"] <= 1.0
        if f["duplicates"] == 0:
            assert f["consistency_distinct"] == pytest.approx(f["consistency"]) and f["stability_distinct"] == pytest.approx(f["stability"])
    header = ("| ProtoPNet | top-1 | consistency | fixed cell | random peak | stability | purity | duplicates | consistency (distinct) "
              "| stability (distinct) | wall time |")
    for line in (header, "| seed 0 |", "| seed 1 |", "| mean |", "| sd |"):
        assert line in printed
    assert record["results"] == record["runs"][0]["results"]


def test_seeds_option_stops_at_the_overrides(capsys):
    bench = _bench_module()
    args = bench.parse_args(["--data", "d", "--seeds", "0", "1", "run.precision=fp32", "data.batch_size=4"])
    assert args.seeds == [0, 1] and args.overrides == ["run.precision=fp32", "data.batch_size=4"]
    assert bench.parse_args(["--data", "d"]).seeds is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "d", "--seeds", "0", "one"])
    assert "--seeds takes whole numbers, got 'one'" in capsys.readouterr().err
