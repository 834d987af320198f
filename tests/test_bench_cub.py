"""bench_cub's interpretability report: what it measures on each ProtoPNet, per seed and over seeds."""

from __future__ import annotations

import json

import pytest

from test_configs import _bench_module
from test_interpretability import COLOURS, GREY, Squares, colour_model


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
            "consistency": 0.25, "consistency_fixed_cell": 0.1, "consistency_random_peak": 0.0, "stability": 0.5, "purity": None}}}},
        {"seed": 7, "results": {"protopnet": {"test_fp32": {"top1": 0.75}, "seconds": 90.0, "interpretability": {
            "consistency": 0.75, "consistency_fixed_cell": 0.1, "consistency_random_peak": 0.0, "stability": 0.7, "purity": None}},
            "baseline": {"test_fp32": {"top1": 0.9}}}},
    ]
    rows = bench.protopnet_rows(runs)
    assert [r["seed"] for r in rows] == [0, 7] and rows[1]["top1"] == 0.75 and rows[1]["seconds"] == 90.0
    table, summary = bench.protopnet_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| ProtoPNet | top-1 | consistency | fixed cell | random peak | stability | purity | wall time |"
    assert lines[2] == "| seed 0 | 50.0 % | 25.0 % | 10.0 % | 0.0 % | 50.0 % | n/a | 30.0 s |"
    assert lines[4] == "| mean | 62.5 % | 50.0 % | 10.0 % | 0.0 % | 60.0 % | n/a | 1 min 00.0 s |"
    assert lines[5] == "| sd | 17.7 % | 35.4 % | 0.0 % | 0.0 % | 14.1 % | n/a | 42.4 s |"  # sample sd: |a - b| / sqrt(2)
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
    from test_prepare import make_cub

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
    for line in ("| ProtoPNet | top-1 | consistency | fixed cell | random peak | stability | purity | wall time |", "| seed 0 |", "| seed 1 |", "| mean |", "| sd |"):
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
