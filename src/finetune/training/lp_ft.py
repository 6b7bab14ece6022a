"""LP-FT (Kumar et al., ICLR 2022): train the new head on frozen features to convergence first (the linear
probe), then fine-tune from that head. Fine-tuning from a random head sends large, random gradients into the
pretrained blocks in the first steps and distorts their features; from a trained head it starts near a good
solution. `strategy=lp_ft` turns this on; warmup and a backbone learning rate below the head's do the rest.

The probe runs when fitting starts, in seconds: the head's inputs are computed once (from the images, or from the
feature cache at the cut when `strategy.cache_features` applies), then the head alone trains on them full-batch.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.errors import UsageError
from finetune.features.partial_forward import module_inputs, skipping

log = logging.getLogger(__name__)


class LinearProbeFirst(L.Callback):
    """Trains the head alone on the frozen network's head inputs before fine-tuning starts (LP-FT).

    Args:
        steps: full-batch AdamW steps of the probe (0: off, fine-tuning starts from the random head).
        lr: the probe's learning rate.
        weight_decay: the probe's decoupled weight decay.
    """

    def __init__(self, steps: int = 0, lr: float = 1e-2, weight_decay: float = 1e-4) -> None:
        if steps < 0:
            raise UsageError(f"strategy.linear_probe_steps={steps} must be 0 (off) or a number of steps")
        self.steps, self.lr, self.weight_decay = steps, lr, weight_decay

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps:
            return
        if trainer.ckpt_path:  # resumed: the head (and everything else) comes from the checkpoint
            return
        device = pl_module.device
        train = self.head_inputs(pl_module, trainer.datamodule, "train", device)
        val = self.head_inputs(pl_module, trainer.datamodule, "val", device)
        head = pl_module.network.get_submodule(pl_module.head_name)
        accuracy = self.fit_head(head, pl_module.training_loss_fn, *train)
        with torch.no_grad():
            val_accuracy = float((head(val[0]).argmax(1) == val[1]).float().mean())
        log.info(
            "linear probe (LP-FT): the head trained alone for %d full-batch steps on %d images' frozen "
            "features: train acc %.4f, val acc %.4f; fine-tuning starts from it",
            self.steps,
            len(train[1]),
            accuracy,
            val_accuracy,
        )

    def fit_head(
        self, head: torch.nn.Module, loss_fn: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> float:
        """Trains `head` on (inputs, labels) full-batch; returns its training accuracy."""
        modes = [module.training for module in head.modules()]
        head.train()
        loss_fn = loss_fn.to(inputs.device)
        optimizer = torch.optim.AdamW(
            [p for p in head.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(head(inputs), labels).backward()
                optimizer.step()
                scheduler.step()
        for module, mode in zip(head.modules(), modes, strict=True):
            module.training = mode
        with torch.no_grad():
            return float((head(inputs).argmax(1) == labels).float().mean())

    @staticmethod
    def head_inputs(pl_module, datamodule, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What the head gets for every image of `split` (training images: their first augmented view), and the
        labels, on `device`."""
        network, head_name = pl_module.network, pl_module.head_name
        cut = pl_module.features_cut
        if cut is None:
            inputs, labels = module_inputs(network, head_name, datamodule.ordered_dataloader(split), device)
            return inputs.to(device), labels.to(device)
        dataset = datamodule.datasets[split]
        count = getattr(dataset, "size", len(dataset))  # a ViewDataset: the first view of each image
        # float(): the cache may hold bf16 features (finetune.model.precision); the probe trains in fp32.
        features, labels = dataset.features[:count].float(), dataset.labels[:count]
        if cut.module == head_name:
            return features.to(device), labels.to(device)
        loader = DataLoader(TensorDataset(features, labels), batch_size=datamodule.batch_size)
        layout = torch.channels_last if pl_module.uses_channels_last else torch.contiguous_format
        with skipping(network, cut.skipped):
            inputs, labels = module_inputs(network, head_name, loader, device, layout)
        return inputs.to(device), labels.to(device)
