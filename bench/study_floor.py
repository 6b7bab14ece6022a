"""Study floor: a finished depth study's wall time against its compute floor on this machine (issue 21, item 5).

The floor is the time the study's training work takes at the raw speed of this machine, with no overhead at all:
every image its fits and its rate search's probes trained on, at the raw training step's images/s, plus every image
its feature passes forwarded, at the frozen part's forward-only images/s. Counted from the sweep folder (each run's
metrics.json, split.csv, .hydra/config.yaml and train.log):

- fit: epochs run (metrics.json `epochs`, early stopping included) x the run's training images (split.csv);
- probes: the rate search's candidates that ran (metrics.json `rate/val_loss/<candidate>`) x the epochs each trains
  (`rate_search.probe_epochs` where the run trains on cached features, `probe_epochs_uncached` where on images; a
  probe never stops early: finetune.training.convergence.choose_rate) x the training images;
- feature passes: a cached run's training images (x its cached views), validation and test images, less those its
  train.log says were reused: the runs of one process share features (finetune.features.store), so a depth's
  first fold forwards every image and its other folds none.

Rates measured in this process on the CPU, with each point's own settings (its first run's model config, batch
size, image size, precision, memory layout): the raw step (bench/step_ratio.raw_step_rate) on images where the
point trains uncached, on a batch of features at its cut (finetune.features.cut.find_cut) where cached; the feature
pass (finetune.features.partial_forward.module_inputs, the network up to the cut, forward only). Not in the floor:
validation, sanity and test passes, set-up, checkpoints, Python between steps: what the ratio puts a price on.

    python bench/study_floor.py --sweep /work/runs/study400 --wall-seconds 2520   # ~2 min of measuring
    python bench/study_floor.py --smoke        # a tiny 2-depth, 2-fold study, then its floor: the suite runs it

Without --wall-seconds the wall is the span of the runs' train.log timestamps (first run's first line to the last
run's last line): process start-up before the first run is not in it. The last line is
`study_floor wall X floor Y ratio Z` (seconds, seconds, wall / floor; issue 21's goal: Z <= 1.25).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from common import add_smoke_argument, machine, revision, smoke_images, today, wait_until_idle
from hydra.utils import instantiate
from omegaconf import OmegaConf
from step_ratio import raw_step_rate
from verdict_check import SMOKE_OVERRIDES, train

from finetune.allocator import keep_freed_memory
from finetune.features.cut import find_cut
from finetune.features.partial_forward import module_inputs
from finetune.study.points import run_folder
from finetune.training.callbacks import use_memory_format, wants_channels_last

CPU = torch.device("cpu")
TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
REUSED = re.compile(r"feature cache: (\d+) of \d+ \w+ images' features reused")


def read_run(folder: Path) -> dict:
    """What the floor needs of one finished run: its config, metrics, split sizes, whether it trained on cached
    features, the feature-pass images it reused, and its first and last log timestamps."""
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    with open(folder / "split.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    log = (folder / "train.log").read_text(encoding="utf-8")
    lines = [TIMESTAMP.match(line) for line in log.splitlines()]
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in lines if m]
    return {
        "name": folder.name,
        "point": run_folder(cfg.strategy.name, cfg.unfreeze),
        "cfg": cfg,
        "metrics": json.loads((folder / "metrics.json").read_text()),
        "splits": Counter(row["split"] for row in rows),
        "classes": sorted({row["class"] for row in rows}),
        "cached": "feature cache on" in log,
        "reused": sum(int(m.group(1)) for m in REUSED.finditer(log)),
        "start": stamps[0],
        "end": stamps[-1],
    }


def count_images(run: dict) -> dict[str, float]:
    """One run's images: trained by its fit and by its rate probes, forwarded by its feature pass; and its measured
    fit + rate-search seconds."""
    metrics, train_images = run["metrics"], run["splits"]["train"]
    candidates = sum(key.startswith("rate/val_loss/") for key in metrics)
    search = run["cfg"].get("rate_search") or {}
    probe_epochs = search.get("probe_epochs" if run["cached"] else "probe_epochs_uncached", 0) if candidates else 0
    views = int(metrics.get("data/cached_views") or 1)
    forwarded = views * train_images + run["splits"]["val"] + run["splits"]["test"] - run["reused"]
    return {
        "fit": metrics["epochs"] * train_images,
        "probe": candidates * probe_epochs * train_images,
        "feature pass": forwarded if run["cached"] else 0,
        "measured": metrics["time/fit_seconds"] + metrics.get("rate/search_seconds", 0.0),
    }


def precision_of(run: dict) -> tuple[str, torch.dtype]:
    """The run's training precision (trainer.precision, or what `auto` chose) and its feature pass's dtype."""
    precision = str(run["cfg"].trainer.precision)
    if precision == "auto":
        precision = "bf16-mixed" if run["metrics"].get("precision/bf16") else "32-true"
    bf16_pass = run["metrics"].get("precision/feature_pass_bf16", "bf16" in precision)
    return precision, torch.bfloat16 if bf16_pass else torch.float32


def measure_rates(run: dict, steps: int) -> dict[str, float | None]:
    """Images/s of the point's raw training step and (cached points) of its feature pass, with the settings of
    `run`: on random images at its batch and size (the cost does not depend on the pixels), and for the step on
    cached features, on the features the timed pass produced."""
    cfg = run["cfg"]
    precision, pass_dtype = precision_of(run)
    torch.manual_seed(0)
    model = instantiate(cfg.model, class_names=run["classes"])
    batch, size = cfg.data.batch_size, model.preprocessing.crop_size
    inputs = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, len(run["classes"]), (batch,))
    cut, pass_rate = None, None
    if run["cached"]:
        depth = model.schedule.max_depth
        cut, why_not = find_cut(model.network, model.blocks, model.head_name, depth, size)
        if cut is None:
            raise SystemExit(f"{run['name']} trained on cached features, but here its network cannot be cut: {why_not}")
        # As finetune.features.cache.build_cache lays the frozen part out; one untimed batch first.
        layout = torch.channels_last if wants_channels_last(model, CPU, on_features=True) else torch.contiguous_format
        model.network.to(memory_format=layout)
        module_inputs(model.network, cut.module, [(inputs, labels)], CPU, layout, pass_dtype)
        started = time.perf_counter()
        features, _ = module_inputs(model.network, cut.module, [(inputs, labels)] * steps, CPU, layout, pass_dtype)
        pass_rate = steps * batch / (time.perf_counter() - started)
        inputs = features[:batch]
    model.features_cut = cut  # what the module's setup reads from the DataModule in a fit
    use_memory_format(model, CPU)  # as MemoryFormatAndCompile lays it out at fit start
    # Lightning's precision plugin for the setting: its forward context is what the fit's steps run under.
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)
    step_rate = raw_step_rate(model, inputs, labels, trainer.precision_plugin.forward_context, steps)
    return {"step": step_rate, "pass": pass_rate, "layout": model.uses_channels_last, "precision": precision}


def smoke_study(work: Path) -> Path:
    """A tiny depth study (random-init MobileNetV2 at 32 px): unfreeze=1 (cached) and all, 2 folds, the rate search
    on at 1 probe epoch."""
    data = smoke_images(work / "data", per_class=12, size=32)
    sweep = work / "sweep"
    overrides = [o for o in SMOKE_OVERRIDES if not o.startswith(("data.folds=", "rate_search="))]
    study = ["experiment=depth_study", f"data.root={data}", "unfreeze=1,all", "data.folds=2"]
    search = ["rate_search.factors=[1.0]", "rate_search.probe_epochs=1", "rate_search.probe_epochs_uncached=1"]
    train([*study, *search, *overrides, f"hydra.sweep.dir={sweep}"], work / "study.log")
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", type=Path, help="a finished depth study's folder (hydra.sweep.dir)")
    parser.add_argument("--wall-seconds", type=float, help="the study's measured wall time (default: its logs' span)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps and feature-pass batches per point")
    add_smoke_argument(parser)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the Trainers built for their precision
    keep_freed_memory()  # the raw rates with the allocator setting every training run has (finetune.allocator)
    work = Path(tempfile.mkdtemp(prefix="study_floor-")) if args.smoke else None
    try:
        if args.smoke:
            args.sweep, args.steps = smoke_study(work), 1
        elif args.sweep is None:
            parser.error("--sweep DIR: the folder of a finished depth study (or --smoke)")
        folders = [p.parent for p in args.sweep.glob("*/metrics.json")]
        if not folders:
            raise SystemExit(f"{args.sweep}: no finished runs (no */metrics.json)")
        runs = sorted((read_run(folder) for folder in folders), key=lambda run: run["start"])
        points = list(dict.fromkeys(run["point"] for run in runs))  # in the order the study ran them
        load = wait_until_idle(-1 if args.smoke else 600)
        print(f"study_floor on {machine(CPU)}, finetune {revision()}, {today()}, load average {load:.2f}")
        print(f"sweep {args.sweep}: {len(runs)} runs, points {', '.join(points)}; {args.steps} timed steps a rate")
        rows, total = [], Counter()
        for point in points:
            mine = [run for run in runs if run["point"] == point]
            counts = sum((Counter(count_images(run)) for run in mine), Counter())
            rates = measure_rates(mine[0], args.steps)
            floor = (counts["fit"] + counts["probe"]) / rates["step"]
            floor += counts["feature pass"] / rates["pass"] if rates["pass"] else 0.0
            rows.append((point, len(mine), counts, rates, floor))
            total.update(counts)
            total["floor"] += floor
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    first = rows[0][3]
    print(f"precision {first['precision']}, channels-last {first['layout']}, batch {runs[0]['cfg'].data.batch_size}")
    print(
        "\n| point | runs | fit images | probe images | feature-pass images | raw step images/s "
        "| feature pass images/s | floor s | measured fit + search s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for point, count, counts, rates, floor in rows:
        feature_rate = f"{rates['pass']:.1f}" if rates["pass"] else "-"
        print(
            f"| {point} | {count} | {counts['fit']:,} | {counts['probe']:,} | {counts['feature pass']:,} | "
            f"{rates['step']:.1f} | {feature_rate} | {floor:.1f} | {counts['measured']:.1f} |"
        )
    print(
        f"| all points | {len(runs)} | {total['fit']:,} | {total['probe']:,} | {total['feature pass']:,} | | | "
        f"{total['floor']:.1f} | {total['measured']:.1f} |"
    )
    span = (max(run["end"] for run in runs) - runs[0]["start"]).total_seconds()
    wall = args.wall_seconds or span
    source = "given (--wall-seconds)" if args.wall_seconds else "the span of the runs' train.log timestamps"
    print(f"\nwall {wall:.1f} s: {source}; the logs span {span:.1f} s ({runs[0]['start']:%H:%M:%S} on)")
    print(f"study_floor wall {wall:.1f} floor {total['floor']:.1f} ratio {wall / total['floor']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
