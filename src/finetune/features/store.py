"""Features shared between the runs of one process: a depth study's folds and seeds run the frozen part once.

One store per process that runs several runs (`finetune.training.run.run` is handed it by its caller); the
DataModule takes it as `feature_store`."""

from __future__ import annotations

import hashlib
import logging

import torch

from finetune.features.cut import Cut
from finetune.features.partial_forward import module_inputs

log = logging.getLogger(__name__)


class SharedFeatures:
    """Each image's features at one cut, kept for the next run in this process: the runs of a Hydra multirun (the
    folds and seeds of a depth study) share them instead of running the frozen part over the same images again.

    Only features that do not change from run to run are kept: those of unaugmented images, under a key made of the
    cut, the preprocessing, the memory layout and a digest of every weight outside the head (a new seed that only
    redraws the head keeps the key; other weights, another cut or image size change it). One key at a time: the
    study sweeps every fold of a depth before the next, so memory stays that of one run's cache.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.by_path: dict[str, torch.Tensor] = {}

    def inputs(self, model, datamodule, cut: Cut, device, layout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each non-empty split's features and labels: those kept reused, the rest computed (and kept)."""
        key = (cut, repr(model.preprocessing), str(layout), _weights_digest(model))  # once a run: reads every weight
        if key != self.key:
            self.key, self.by_path = key, {}
        return {
            split: self._split_inputs(model, datamodule, cut, split, device, layout)
            for split in ("train", "val", "test")
            if datamodule.splits[split]
        }

    def _split_inputs(
        self, model, datamodule, cut: Cut, split: str, device, layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        samples = datamodule.splits[split]
        missing = [index for index, (path, _) in enumerate(samples) if path not in self.by_path]
        if missing:
            loader = datamodule.ordered_dataloader(split, indices=missing)
            features, _ = module_inputs(model.network, cut.module, loader, device, layout)
            self.by_path.update((samples[index][0], feature) for index, feature in zip(missing, features, strict=True))
        if len(missing) < len(samples):
            log.info(
                "feature cache: %d of %d %s images' features reused from an earlier run in this process",
                len(samples) - len(missing),
                len(samples),
                split,
            )
        features = torch.stack([self.by_path[path] for path, _ in samples])
        return features, torch.tensor([label for _, label in samples])


def _weights_digest(model) -> str:
    """A digest of the network's weights and buffers outside the head, whose input the cache never depends on."""
    digest = hashlib.blake2b(digest_size=16)
    head = model.head_name + "."
    for name, tensor in [*model.network.named_parameters(), *model.network.named_buffers()]:
        if not name.startswith(head):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
