"""The data pipeline: how much of each training step waits for data, with images decoded every epoch, decoded once
and kept in memory, and augmented on the device.

Every variant trains the same network on the same work in this one process: MobileNetV2 (torchvision, random init:
`model.weights=null`, so nothing is downloaded; the step costs what a pretrained one does), `unfreeze=2`, AdamW at
a constant 1e-3, batch 32, seed 42, the same split, epochs and per-image augmentation parameters. Validation is off:
this measures the training pipeline. The variants (`--variants`, in order; the first is the baseline):

- files:   data.cache_images=false: every epoch, the loader workers decode every file, crop, rotate, flip, normalise.
- cached:  data.cache_images=true: decoded once into memory (timed apart, as "cache s"), augmented in the workers.
- device:  data.cache_images=true data.augment_on=device: the workers only batch uint8 images; crop, rotation, flip
           and normalisation run on the device, a batch at a time.
- any of them with +compile (model.compile=true), +bf16 (trainer.precision=bf16-mixed), +fp32
  (trainer.precision=32-true), +nchw (model.channels_last=false) or +nhwc (model.channels_last=true): e.g.
  `--variants device,device+compile`. On CUDA the variants start from bf16-mixed and channels-last (trainer=gpu).

Per training step, a callback takes the **data wait** (from the end of the previous step, or the start of the epoch,
to the start of this step: waiting for the loader, the transfer to the device, device-side augmentation) and the
**compute** (forward, backward, optimizer step). On CUDA both ends are synchronised. `data_fraction` = data wait /
(data wait + compute), over all steps; images/s = training images / that time; "steady" leaves the first epoch out
(worker start, compilation). The last line is `data_fraction X speedup Y`: the last variant's data fraction and
its images/s over the first's.

    python bench/data_pipeline.py --quick            # ~2 min on a 2-core CPU: 300 ELPV images, 224 px, 2 repeats
    python bench/data_pipeline.py                    # the whole ELPV set, 224 px, 3 epochs, 1 repeat
    python bench/data_pipeline.py --device cuda      # a GPU: bf16-mixed, channels-last (trainer=gpu's settings)
    python bench/data_pipeline.py --smoke            # seconds, tiny generated images: the suite runs it
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import psutil
import torch
from common import (
    QUIET_CORES,
    ResourceSampler,
    add_idle_arguments,
    add_smoke_argument,
    load,
    machine,
    release_memory,
    resolve_device,
    revision,
    smoke_images,
    subset,
    today,
    wait_until_idle,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from finetune.data.demo import demo_root

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED = 42
VARIANTS = {
    "files": ["data.cache_images=false", "data.augment_on=loader"],
    "cached": ["data.cache_images=true", "data.augment_on=loader"],
    "device": ["data.cache_images=true", "data.augment_on=device"],
}
SWITCHES = {
    "compile": ["model.compile=true"],
    "bf16": ["trainer.precision=bf16-mixed"],
    "fp32": ["trainer.precision=32-true"],
    "nchw": ["model.channels_last=false"],
    "nhwc": ["model.channels_last=true"],
}

warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*The number of training batches.*")


class StepTimer(L.Callback):
    """Data wait and compute of every training step; loader workers' unique memory after the first epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[tuple[int, float, float]] = []  # (epoch, data wait s, compute s)
        self.workers_uss = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self._ready = self._now()

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        end = self._now()
        self.steps.append((trainer.current_epoch, self._start - self._ready, end - self._start))
        self._ready = end

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == 0:  # what the workers hold that the main process does not share with them
            total = 0
            for child in psutil.Process().children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except psutil.Error:
                    continue
            self.workers_uss = total / 2**20


def config(root: Path, work: Path, args, device: torch.device, extra: list[str]):
    overrides = [
        "model=mobilenet_v2",
        "model.weights=null",
        "unfreeze=2",
        "strategy=finetune",
        "strategy.scheduler=constant",
        f"seed={SEED}",
        f"data.root={root}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"paths.output_dir={work / 'run'}",
    ]
    # As trainer=gpu on CUDA; fp32 on the CPU, as this bench's earlier figures (+bf16 switches it).
    overrides.append("trainer.precision=bf16-mixed" if device.type == "cuda" else "trainer.precision=32-true")
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides + extra)


def variant_overrides(name: str) -> list[str]:
    base, *switches = name.split("+")
    if base not in VARIANTS or any(s not in SWITCHES for s in switches):
        raise SystemExit(f"unknown variant {name!r}: {'/'.join(VARIANTS)}, optionally +{'+'.join(SWITCHES)}")
    return VARIANTS[base] + [o for s in switches for o in SWITCHES[s]]


def run(root: Path, work: Path, args, device: torch.device, name: str) -> dict:
    cfg = config(root, work, args, device, variant_overrides(name))
    L.seed_everything(SEED, workers=True, verbose=False)
    with ResourceSampler(device) as sampler:
        data = instantiate(cfg.data)
        data.prepare_data()
        model = instantiate(cfg.model, class_names=data.class_names)
        model.preprocessing = model.preprocessing.at_size(cfg.data.image_size)
        data.preprocessing = model.preprocessing
        started = time.perf_counter()
        data.setup("fit")  # decodes the cache, if any; the trainer's own setup call then finds it built
        cache_s = time.perf_counter() - started
        timer = StepTimer(device)
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        fit_start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_s = time.perf_counter() - fit_start
    images = len(data.splits["train"])
    waits = [w for _, w, _ in timer.steps]
    computes = [c for _, _, c in timer.steps]
    steady = [(w, c) for e, w, c in timer.steps if e > 0]
    total = sum(waits) + sum(computes)
    result = {
        "name": name,
        "cache_s": cache_s,
        "fit_s": fit_s,
        "steps": len(timer.steps),
        "data_s": sum(waits),
        "compute_s": sum(computes),
        "fraction": sum(waits) / total,
        "images_s": images * args.epochs / total,
        "first_epoch_s": sum(w + c for e, w, c in timer.steps if e == 0),
        "steady_fraction": sum(w for w, _ in steady) / sum(w + c for w, c in steady) if steady else float("nan"),
        "steady_images_s": len(steady) * args.batch_size / sum(w + c for w, c in steady) if steady else float("nan"),
        "median_wait_ms": 1000 * statistics.median(waits),
        "median_compute_ms": 1000 * statistics.median(computes),
        "cached_mb": sum(d.nbytes for d in data.images.decoded.values()) / 1e6,
        "workers": data.num_workers,
        "workers_uss_mib": timer.workers_uss,
        "train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    result.update(sampler.result())
    del trainer, model, data
    release_memory()
    return result


def measure(root: Path, work: Path, args, device: torch.device, name: str) -> dict:
    for attempt in range(args.retries + 1):
        wait_until_idle(args.max_wait, use_load=False)
        result = run(root, work, args, device, name)
        result["busy"] = device.type != "cuda" and result["other_cores"] >= QUIET_CORES
        print(
            f"  {name}: {result['fit_s']:.1f} s fit, data fraction {result['fraction']:.3f}, "
            f"{result['images_s']:.1f} images/s (other processes {result['other_cores']:.2f} cores)",
            flush=True,
        )
        if not result["busy"]:
            break
        print(f"  (other processes used the CPU: {'again' if attempt < args.retries else 'kept, flagged busy'})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="150 images a class, 3 epochs, 2 repeats (~2 min on 2 cores)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--variants",
        default="files,cached,device",
        help="comma-separated, the first is the baseline (default files,cached,device)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds over the variants, medians reported (default 1; --quick 2)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=None, help="first N images a class (--quick: 150)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the data module's (cores - 1, <= 8)")
    parser.add_argument("--data-root", default=None, help="an image folder instead of the ELPV demo")
    add_idle_arguments(parser, "variant")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.image_size, args.batch_size, args.num_workers = 1, 32, 8, 0
        args.repeats, args.max_wait, args.retries = 1, -1, 0
    args.repeats = args.repeats or (2 if args.quick else 1)
    per_class = args.per_class or (150 if args.quick else None)
    device = resolve_device(args.device)
    names = args.variants.split(",")
    for name in names:
        variant_overrides(name)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="finetune-data-pipeline-") as work:
        if args.smoke:
            root = smoke_images(Path(work) / "smoke")
        else:
            root = Path(args.data_root).expanduser() if args.data_root else demo_root("elpv")
        if per_class and not args.smoke:
            root = subset(root, Path(work) / "data", per_class)
        start_load = wait_until_idle(args.max_wait)
        print(f"# {' '.join(['python', 'bench/data_pipeline.py', *sys.argv[1:]])}")
        print(f"# {today()}; {machine(device)}; finetune {revision()}; load average {start_load:.2f}")
        print(
            f"# data {root} ({f'first {per_class} a class' if per_class else 'all'}), {args.image_size} px, batch "
            f"{args.batch_size}, {args.epochs} epochs; mobilenet_v2 random init, unfreeze=2, AdamW 1e-3 constant"
            + ("; bf16-mixed" if device.type == "cuda" else "")
        )
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                runs[name].append(measure(root, Path(work), args, device, name))

    rows = [
        {
            key: (statistics.median(r[key] for r in results) if isinstance(results[0][key], float) else results[0][key])
            for key in results[0]
        }
        | {"busy": any(r["busy"] for r in results)}
        for results in runs.values()
    ]
    memory = "GPU peak MiB" if device.type == "cuda" else "RSS peak MiB"
    print(
        f"\n| variant | cache s | fit s | steps | data wait s | compute s | data fraction | images/s | first epoch s "
        f"| steady data fraction | steady images/s | wait / compute ms (median) | {memory} | workers RSS / USS MiB "
        "| cached MB | train loss |"
    )
    print("|---|" + "---:|" * 15)
    for r in rows:
        peak = r["cuda_peak_mib"] if device.type == "cuda" else r["rss_peak_mib"]
        print(
            f"| {r['name']}{' (busy)' if r['busy'] else ''} | {r['cache_s']:.1f} | {r['fit_s']:.1f} | {r['steps']} "
            f"| {r['data_s']:.1f} | {r['compute_s']:.1f} | {r['fraction']:.3f} | {r['images_s']:.1f} "
            f"| {r['first_epoch_s']:.1f} | {r['steady_fraction']:.3f} | {r['steady_images_s']:.1f} "
            f"| {r['median_wait_ms']:.0f} / {r['median_compute_ms']:.0f} | {peak:.0f} "
            f"| {r['workers_rss_peak_mib']:.0f} / {r['workers_uss_mib']:.0f} | {r['cached_mb']:.0f} "
            f"| {r['train_loss']:.4f} |"
        )
    print(
        f"\n{rows[0]['workers']} loader worker(s); load average at the variants' starts "
        f"{min(r['load_start'] for r in rows):.2f} to {max(r['load_start'] for r in rows):.2f}, other processes "
        f"<= {max(r['other_cores'] for r in rows):.2f} cores; load average now {load():.2f}"
    )
    first, last = rows[0], rows[-1]
    print(
        f"{last['name']} vs {first['name']}: data fraction {first['fraction']:.3f} -> {last['fraction']:.3f}, "
        f"images/s {first['images_s']:.1f} -> {last['images_s']:.1f}"
    )
    print(f"data_fraction {last['fraction']:.3f} speedup {last['images_s'] / first['images_s']:.2f}")


if __name__ == "__main__":
    main()
