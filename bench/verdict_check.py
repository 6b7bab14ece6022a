"""Verdict check: the depth study's verdict against held-out truth, on ELPV (issue 20, item 4).

For each of R repeats (seeded by the repeat):
1. draw a stratified study set of N ELPV images (default 400: 275 functional, 125 defective, ELPV's shares);
2. run the depth study on it, as a user would: `python train.py experiment=depth_study data.root=<study set>
   unfreeze=<depths>` (5 folds, each point at its own rate), and read its report (intervals, recommendation);
3. train every depth once on the whole study set (a validation share carved out as the study's folds carve it:
   data.split's val : train), with the study's own settings (`experiment=depth_study hydra.mode=RUN`), and test it
   on every ELPV image outside the study set (2,224 images at N=400): the held-out truth.

Over the repeats it reports:
- coverage: the share of the study's 95% intervals for "depth - transfer learning" that contain the held-out
  difference;
- agreement: the share of repeats whose recommended depth's held-out accuracy lies within the 95% interval
  (bootstrap over the held-out images) of the held-out best depth's accuracy;
- regret: the held-out points lost by following the recommendation instead of taking the held-out best (mean over
  repeats), for the report's rule and, from the same runs, for the others in RULES (always the cheapest point not
  significantly worse than the best; always the best accuracy estimate; the report's earlier rule, the best accuracy
  estimate within 60 s of the cheapest; the lowest Brier score at any cost);
- as a diagnostic, the coverage and width of per-image paired intervals from the study's out-of-fold predictions
  beside the report's fold intervals.

A finished repeat's study is re-analysed by today's rules each time (its runs are kept in --work), so a changed
rule is scored on the same runs.

    python bench/verdict_check.py                          # 5 repeats, N=400, depths 0,2,4 (~10 min a repeat)
    python bench/verdict_check.py --repeats 8 --depths 0,1,2,4
    python bench/verdict_check.py --smoke                  # tiny generated images, 1 repeat: checks that it runs

Repeats already finished in --work are read, not run again: a stopped check resumes. The last line is
`verdict_check coverage X agreement Y regret Z repeats R` (issue 20's goals: coverage >= 0.90, agreement >= 0.80,
regret <= 1 point).

Caveat: each held-out point is one training run (one seed), so the "truth" carries its own run-to-run noise; ELPV's
6 near-duplicate pairs may fall across the study set and the held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import add_smoke_argument, machine, revision, smoke_images, today

from finetune.data.demo import demo_root
from finetune.study.analysis import analyse
from finetune.study.recommend import ACCURACY, BRIER, Rule
from finetune.study.stats import bootstrap
from finetune.study.sweep import build_report

REPO = Path(__file__).resolve().parents[1]
# The held-out runs carve their validation share from the study set as the study's folds do: data.split's
# val : train (0.2 : 0.7 by default).
VAL_SHARE = 0.2 / (0.7 + 0.2)
RULES = {
    "report": Rule(),  # the report's: the lowest Brier score among points within 60 s of the cheapest
    "cheapest": Rule(0.0),
    "best-estimate": Rule(math.inf, ACCURACY),
    "accuracy-60s": Rule(rank_by=ACCURACY),  # the report's until 2026-12-06 (third session; it also weighed latency)
    "brier-any-cost": Rule(math.inf, BRIER),
}
# Tiny and fast: random-init MobileNetV2 at 32 px, 3 folds, 2 epochs (its figures mean nothing).
SMOKE_OVERRIDES = (
    "model=mobilenet_v2",
    "model.weights=null",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.folds=3",
    "trainer.max_epochs=2",
    "rate_search=null",
)


def draw(source: Path, target: Path, size: int, seed: int) -> tuple[Path, Path]:
    """A stratified draw of `size` images from an ImageFolder root (each class in its share, seeded), hard-linked to
    target/study/<class>/; the rest to target/heldout/<class>/. Returns both roots."""
    rng = np.random.default_rng(seed)
    classes = {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(source.iterdir()) if d.is_dir()}
    total = sum(len(paths) for paths in classes.values())
    for name, paths in classes.items():
        take = round(size * len(paths) / total)
        chosen = set(rng.choice(len(paths), size=take, replace=False).tolist())
        for index, path in enumerate(paths):
            _link(path, target / ("study" if index in chosen else "heldout") / name / path.name)
    return target / "study", target / "heldout"


def holdout_layout(study: Path, heldout: Path, target: Path, seed: int) -> Path:
    """target/{train,val,test}/<class>/: the study set split into train and val (stratified, seeded), and the held-out
    images as test, a layout the DataModule takes as it is."""
    rng = np.random.default_rng(seed)
    for class_dir in sorted(d for d in study.iterdir() if d.is_dir()):
        paths = sorted(p for p in class_dir.iterdir() if p.is_file())
        val = set(rng.choice(len(paths), size=max(1, round(VAL_SHARE * len(paths))), replace=False).tolist())
        for index, path in enumerate(paths):
            _link(path, target / ("val" if index in val else "train") / class_dir.name / path.name)
        for path in sorted((heldout / class_dir.name).iterdir()):
            _link(path, target / "test" / class_dir.name / path.name)
    return target


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def train(overrides: list[str], log: Path) -> float:
    """`python train.py <overrides>` in a subprocess, its output to `log`; returns its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        raise SystemExit(f"python train.py {' '.join(overrides)} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def correct_by_path(run_dir: Path) -> dict[str, float]:
    """1.0 for each test image the run classified right, 0.0 otherwise, by path (its test_predictions.csv)."""
    import csv

    with open(run_dir / "test_predictions.csv", newline="", encoding="utf-8") as file:
        return {row["path"]: float(row["label"] == row["predicted"]) for row in csv.DictReader(file)}


def correct_per_image(run_dir: Path) -> np.ndarray:
    """correct_by_path's values, sorted by path."""
    correct = correct_by_path(run_dir)
    return np.array([correct[path] for path in sorted(correct)])


def study_findings(sweep: Path) -> dict:
    """The study's intervals for each depth against transfer learning and its recommendation under each rule."""
    report = build_report(sweep)
    (group,) = report.study.groups
    findings = {
        "vs_transfer": {
            str(c.point.point.unfreeze): [c.difference.mean, c.difference.low, c.difference.high]
            for c in group.vs_transfer
        },
        "accuracy": {str(p.point.unfreeze): p.acc.mean for p in group.points},
        "fit_seconds": {str(p.point.unfreeze): p.cost("time/fit_seconds") for p in group.points},
        "verdict": group.verdict,
    }
    for name, rule in RULES.items():
        (judged,) = analyse(report, rule).groups
        findings.setdefault("recommended", {})[name] = str(judged.recommended.point.unfreeze)
    findings["vs_transfer_per_image"] = per_image_intervals(sweep, findings["vs_transfer"])
    return findings


def per_image_intervals(sweep: Path, depths) -> dict:
    """For each depth, "depth - transfer learning" from the study's out-of-fold predictions paired per image (every
    image is tested once over the folds): a percentile bootstrap over the images. A diagnostic beside the fold
    intervals (issue 20, item 3: do intervals from all the paired per-image evidence still cover?)."""
    correct = {}
    for depth in ["0", *depths]:
        correct[depth] = {}
        for fold in sorted(sweep.glob(f"unfreeze-{depth}_fold-*")):
            correct[depth] |= correct_by_path(fold)
    intervals = {}
    for depth in depths:
        shared = sorted(set(correct[depth]) & set(correct["0"]))
        differences = np.array([correct[depth][path] - correct["0"][path] for path in shared])
        estimate = bootstrap(lambda idx, d=differences: float(d[idx].mean()), len(shared))
        intervals[depth] = [estimate.mean, estimate.low, estimate.high]
    return intervals


def held_out_findings(runs: dict[str, Path]) -> dict:
    """Each depth's held-out accuracy, and the 95% interval of the best one's (bootstrap over the images)."""
    correct = {depth: correct_per_image(path) for depth, path in runs.items()}
    accuracy = {depth: float(values.mean()) for depth, values in correct.items()}
    best = max(accuracy, key=accuracy.get)
    interval = bootstrap(lambda idx: float(correct[best][idx].mean()), len(correct[best]))
    return {
        "accuracy": accuracy,
        "best": best,
        "best_interval": [interval.low, interval.high],
        "images": len(correct[best]),
    }


def run_repeat(repeat: int, args, source: Path, work: Path) -> dict:
    """One repeat: draw, study, held-out training; its findings, also written to work/repeat-K/result.json."""
    folder = work / f"repeat-{repeat}"
    result_file = folder / "result.json"
    if result_file.exists():
        print(f"repeat {repeat}: read from {result_file}; its study re-analysed by today's rules", flush=True)
        result = json.loads(result_file.read_text())
        if (folder / "study").is_dir():
            result["study"] = study_findings(folder / "study")
        return result
    if folder.exists():
        shutil.rmtree(folder)  # a repeat stopped part-way starts again
    study, heldout = draw(source, folder / "images", args.size, seed=repeat)
    extra = list(args.override)
    sweep = folder / "study"
    study_seconds = train(
        ["experiment=depth_study", f"data.root={study}", f"unfreeze={args.depths}", f"hydra.sweep.dir={sweep}"] + extra,
        folder / "study.log",
    )
    layout = holdout_layout(study, heldout, folder / "images" / "layout", seed=repeat)
    runs, held_out_seconds = {}, 0.0
    for depth in args.depths.split(","):
        runs[depth] = folder / "heldout" / f"unfreeze-{depth}"
        held_out_seconds += train(
            [
                "experiment=depth_study",
                "hydra.mode=RUN",
                f"hydra.run.dir={runs[depth]}",
                f"data.root={layout}",
                "data.folds=null",
                f"unfreeze={depth}",
            ]
            + [override for override in extra if not override.startswith("data.folds=")],  # one split, no folds
            folder / f"heldout-{depth}.log",
        )
    result = {
        "repeat": repeat,
        "study": study_findings(sweep),
        "held_out": held_out_findings(runs),
        "seconds": {"study": study_seconds, "held_out": held_out_seconds},
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def score(result: dict, rule: str = "report", intervals: str = "vs_transfer") -> dict:
    """One repeat's coverage hits (of the fold intervals, or of `intervals`), agreement and regret (points)."""
    held = result["held_out"]["accuracy"]
    transfer = held["0"]
    hits = [low <= held[depth] - transfer <= high for depth, (_, low, high) in result["study"][intervals].items()]
    recommended = result["study"]["recommended"][rule]
    low, high = result["held_out"]["best_interval"]
    best = held[result["held_out"]["best"]]
    return {
        "hits": hits,
        "agrees": low <= held[recommended] <= high,
        "regret": 100 * (best - held[recommended]),
    }


def print_table(results: list[dict], depths: list[str]) -> None:
    print(
        "\n| repeat | study acc: " + " / ".join(depths) + " | held out: " + " / ".join(depths) + " | recommended "
        "(" + " / ".join(RULES) + " rule) | held-out best | regret (points) | study s | held-out s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        study = " / ".join(f"{100 * r['study']['accuracy'][d]:.1f}" for d in depths)
        held = " / ".join(f"{100 * r['held_out']['accuracy'][d]:.2f}" for d in depths)
        recommended = " / ".join(r["study"]["recommended"][rule] for rule in RULES)
        print(
            f"| {r['repeat']} | {study} | {held} | {recommended} | {r['held_out']['best']} | "
            f"{score(r)['regret']:.2f} | {r['seconds']['study']:.0f} | {r['seconds']['held_out']:.0f} |"
        )
    print("\n| depth vs transfer | study 95% CI (points) per repeat | held-out difference | covered |")
    print("|---|---|---|---|")
    for r in results:
        held = r["held_out"]["accuracy"]
        for depth, (mean, low, high) in r["study"]["vs_transfer"].items():
            difference = held[depth] - held["0"]
            print(
                f"| {depth} (repeat {r['repeat']}) | {100 * mean:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) | "
                f"{100 * difference:+.2f} | {'yes' if low <= difference <= high else 'NO'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=400, help="images in each study set")
    parser.add_argument("--depths", default="0,2,4", help="the study's depths (0 must be one)")
    parser.add_argument("--work", type=Path, default=None, help="keeps every repeat's runs (default: a temp folder)")
    parser.add_argument("--override", action="append", default=[], help="a train.py override for every run")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if "0" not in args.depths.split(","):
        parser.error("--depths must include 0 (transfer learning, the reference)")
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="verdict-check-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        source = smoke_images(work / "smoke-data", per_class=20, size=32)
        args.repeats, args.size, args.depths = 1, 24, "0,1"
        args.override = [*SMOKE_OVERRIDES, *args.override]
    else:
        source = demo_root("elpv")
    print(f"# verdict_check, {today()}, {machine_line()}, revision {revision()}", flush=True)
    print(
        f"# {args.repeats} repeats, study sets of {args.size} images, depths {args.depths}; work in {work}", flush=True
    )
    results = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        results.append(run_repeat(repeat, args, source, work))
        scored = score(results[-1])
        print(
            f"repeat {repeat}: recommended unfreeze={results[-1]['study']['recommended']['report']}, "
            f"held-out best unfreeze={results[-1]['held_out']['best']}, regret {scored['regret']:.2f} points, "
            f"covered {sum(scored['hits'])}/{len(scored['hits'])} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    depths = args.depths.split(",")
    print_table(results, depths)
    print()
    for rule in RULES:
        scores = [score(r, rule) for r in results]
        regrets = [s["regret"] for s in scores]
        print(
            f"{rule} rule: agreement {statistics.fmean(s['agrees'] for s in scores):.2f}, regret mean "
            f"{statistics.fmean(regrets):.2f} points (max {max(regrets):.2f})"
        )
    for intervals, name in (("vs_transfer", "fold intervals (the report's)"), ("vs_transfer_per_image", "per-image")):
        hits = [hit for r in results for hit in score(r, intervals=intervals)["hits"]]
        widths = [100 * (high - low) for r in results for _, low, high in r["study"][intervals].values()]
        print(
            f"{name}: coverage {statistics.fmean(hits):.2f} of {len(hits)}, mean width {statistics.fmean(widths):.1f} "
            "points"
        )
    scores = [score(r) for r in results]
    hits = [hit for s in scores for hit in s["hits"]]
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
    agreement, regret = statistics.fmean(s["agrees"] for s in scores), statistics.fmean(s["regret"] for s in scores)
    print(
        f"verdict_check coverage {statistics.fmean(hits):.2f} agreement {agreement:.2f} regret {regret:.2f} "
        f"repeats {len(results)}"
    )


def machine_line() -> str:
    import torch

    return machine(torch.device("cpu"))


if __name__ == "__main__":
    main()
