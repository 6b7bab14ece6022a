"""Per-image test predictions and inference latency, written by a callback for the report's paired statistics.

`test_predictions.csv` (path relative to the data root, label, predicted, one probability per class) lets the
report compare two points on the same images (McNemar's test, bootstrap intervals) and pool the folds of a k-fold
study into one out-of-fold confusion matrix. `test_latency.json` gives the inference time of the whole network per
image: the same network runs at every unfreeze depth, so it tells models apart, not depths.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class TestPredictions(L.Callback):
    """Writes every test image's prediction, and the network's inference latency, into the run folder.

    Args:
        dirpath: the run folder (`${paths.output_dir}`).
        latency_batch: images per batch when timing inference (0: no timing).
        latency_repeats: timed batches after one untimed warm-up batch.
    """

    def __init__(self, dirpath: str, latency_batch: int = 8, latency_repeats: int = 3) -> None:
        self.dirpath = Path(dirpath)
        self.latency_batch = latency_batch
        self.latency_repeats = latency_repeats
        self._labels: list[torch.Tensor] = []
        self._probabilities: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._labels, self._probabilities = [], []

    @torch.no_grad()
    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        labels = batch[1]
        logits = outputs["logits"]  # the test step's own (from images, or from cached features)
        self._probabilities.append(logits.float().softmax(dim=1).cpu())
        self._labels.append(labels.cpu())

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.world_size > 1:  # each process saw a share of the test images: nothing complete to write
            log.info("test_predictions.csv is not written under DDP (each process holds a share of the test set)")
            return
        datamodule = trainer.datamodule
        samples = datamodule.splits["test"]
        probabilities = torch.cat(self._probabilities) if self._probabilities else torch.empty(0)
        if len(probabilities) != len(samples):  # a limited test (limit_test_batches): not the whole split
            log.info(
                "test_predictions.csv not written: %d predictions for %d test images", len(probabilities), len(samples)
            )
            return
        names = datamodule.class_names
        path = self.dirpath / "test_predictions.csv"
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "label", "predicted", *(f"p_{name}" for name in names)])
            for (image, label), row in zip(samples, probabilities.tolist(), strict=True):
                predicted = max(range(len(row)), key=row.__getitem__)
                writer.writerow(
                    [
                        os.path.relpath(image, datamodule.root),
                        names[label],
                        names[predicted],
                        *(f"{p:.5f}" for p in row),
                    ]
                )
        if self.latency_batch:
            latency = inference_latency(pl_module, self.latency_batch, self.latency_repeats)
            (self.dirpath / "test_latency.json").write_text(json.dumps(latency, indent=2) + "\n")


@torch.no_grad()
def inference_latency(pl_module, batch_size: int, repeats: int) -> dict[str, float]:
    """Milliseconds per image of the whole network in eval mode on its device, on a batch of the trained size."""
    size = pl_module.preprocessing.crop_size
    images = torch.rand(batch_size, 3, size, size, device=pl_module.device)
    if pl_module.uses_channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    network, was_training = pl_module.network, pl_module.network.training
    network.eval()
    try:
        network(images)  # warm-up: first-call allocations and kernel selection
        if images.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            network(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    finally:
        network.train(was_training)
    return {
        "time/inference_ms_per_image": 1000 * seconds / (repeats * batch_size),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "device": str(images.device),
    }
