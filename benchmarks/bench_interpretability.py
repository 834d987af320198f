"""What do the interpretability metrics say about a model, and what do they cost?

Runs :func:`protopnet.interpretability.evaluate_interpretability` on a model directory and prints
the figures (with chance levels), the deletion curves, and the seconds each stage took (the test
pass is shared: forward, consistency + stability — including the noisy forward — activation
localisation and deletion are timed separately inside it; purity is its own scan of the train
split).

    python benchmarks/bench_interpretability.py runs/demo/model --data synthetic
    python benchmarks/bench_interpretability.py runs/cub/model --data /data/CUB_200_2011 --limit 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model directory")
    parser.add_argument("--data", default="synthetic", help="dataset spec, as for protopnet evaluate (default synthetic)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test items (evenly spaced)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="deletion curve steps")
    parser.add_argument("--k", type=int, default=5, help="nearest patches for purity")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the full figures here")
    parser.add_argument("--html", help="also write the report sections as an HTML page here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from protopnet.cli.common import dataset_for_model, load_model_or_fail
    from protopnet.explain.html import Report
    from protopnet.interpretability import SCALARS, evaluate_interpretability, interpretability_sections

    start = time.perf_counter()
    model = load_model_or_fail(args.model, args.device)
    test = dataset_for_model(model, args.data, args.split)
    try:
        train = dataset_for_model(model, args.data, "train")
    except Exception as error:  # noqa: BLE001 - any failure: fall back to the test split
        print(f"(no train split: {error}; purity scans the test split)")
        train = None
    indices = None
    if args.limit is not None and args.limit < len(test):
        indices = [round(i * len(test) / args.limit) for i in range(args.limit)]
    load_seconds = time.perf_counter() - start
    device = next(model.parameters()).device

    figures = evaluate_interpretability(
        model, test, train_dataset=train, indices=indices, batch_size=args.batch_size, device=device, deletion_steps=args.steps, k=args.k
    )
    print(f"model {args.model}: {figures['n_prototypes']} prototypes, {figures['n_images']} {args.split} images of {args.data!r} on {device}")
    print(f"parts: {', '.join(figures['parts']) or 'none'}\n")
    print(f"{'metric':<26}{'value':>10}{'chance':>10}")
    details = figures["details"]
    for name in SCALARS:
        value = figures[name]
        chance = (details.get(name) or {}).get("chance") if name != "deletion_gap" else 0.0
        shown = "skipped" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{name:<26}{shown:>10}{'' if chance is None else f'{chance:.4f}':>10}")
    for name, reason in figures["skipped"].items():
        print(f"  {name}: {reason}")
    deletion = details.get("deletion")
    if deletion and deletion.get("top") is not None:
        print(f"\ndeletion curves (mean predicted-class logit; grid {deletion['grid'][0]}x{deletion['grid'][1]})")
        print(f"{'masked':>8}{'evidence':>12}{'random':>12}")
        for f, t, r in zip(deletion["fractions"], deletion["top"], deletion["random"]):
            print(f"{f:>8.3f}{t:>12.4f}{r:>12.4f}")
    print("\nseconds")
    print(f"{'load model + data':<26}{load_seconds:>10.3f}")
    for name, seconds in figures["timings"].items():
        print(f"{name:<26}{seconds:>10.3f}")
    if figures["n_images"]:
        print(f"{'per test image (total)':<26}{figures['timings']['total'] / figures['n_images']:>10.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1, allow_nan=False)
    if args.html:
        report = Report("Interpretability", subtitle=args.model)
        for section in interpretability_sections(figures):
            report.add(section)
        report.write(args.html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
