"""Per-step overhead: our training step on cached features against the plain PyTorch loop on the same head.

With the feature cache (strategy.cache_features), transfer learning trains the head alone on stored features: a
step is a Linear layer on 32 vectors, microseconds of work, so what a step costs beyond that is the training
loop's own overhead (Lightning's hooks, logging, torchmetrics). On a GPU it decides how much the cache saves.

Both sides train the head of EfficientNet-Lite0 (1,280 features, 2 classes, the architecture's dropout 0.2) on
the same synthetic features (as many as ELPV's train / val split: 1,837 / 525, labels from a fixed linear rule),
from the same initial weights, with AdamW (lr 1e-3, weight decay 1e-4, constant), batch 32, in the same
per-epoch order (`EpochShuffler`, seed 0) and the same dropout masks (seeded alike), in this one process:

- plain: the tutorials' loop on the head: per batch zero_grad, dropout, head, loss, backward, step, running loss
  and accuracy (`.item()`); a no_grad validation pass; `torch.save` of the network's state_dict when the
  validation loss improves;
- ours: `finetune.model.module.ImageClassifier` training on the cache (`features_cut` at the head), with the Trainer,
  callbacks and logger of the real conf/ (as `python train.py` builds them; no progress bar), `trainer.fit`.

    python bench/step_overhead.py            # 20 epochs (1,160 steps), 3 repeats: about 30 s on 2 cores
    python bench/step_overhead.py --quick    # 5 epochs
    python bench/step_overhead.py --device cuda
    python bench/step_overhead.py --smoke    # 1 epoch, 1 repeat: the suite runs it

The last line is `overhead X ms a step, ratio Y`: (ours - plain) / training steps, and ours / plain.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_smoke_argument, machine, resolve_device, revision, today, wait_until_idle  # noqa: E402

from finetune.data.samplers import EpochShuffler, FeatureDataset, as_batch  # noqa: E402
from finetune.features.cache import Cut  # noqa: E402
from finetune.model.module import ImageClassifier  # noqa: E402
from finetune.training.loggers import instantiate_loggers  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
TRAIN, VAL, FEATURES, BATCH, SEED = 1837, 525, 1280, 32, 0
HEAD = "classifier"  # tf_efficientnet_lite0's head, where its features are cached
LR, WEIGHT_DECAY = 1e-3, 1e-4

warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def synthetic_features(count: int, generator: torch.Generator, rule: torch.Tensor):
    features = torch.randn(count, FEATURES, generator=generator)
    return features, (features @ rule > 0).long()


class CachedFeatures(L.LightningDataModule):
    """Cached features served as `finetune.data.datamodule` serves them: whole batches, our epoch order, no workers."""

    def __init__(self, train, val) -> None:
        super().__init__()
        self.train, self.val = FeatureDataset(*train), FeatureDataset(*val)
        self.features_cut = Cut(HEAD, (), (FEATURES,))  # what the model reads in its setup: features at the head

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train,
            batch_size=BATCH,
            sampler=EpochShuffler(len(self.train), SEED),
            collate_fn=as_batch,
            generator=torch.Generator().manual_seed(SEED),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=BATCH, collate_fn=as_batch)


def new_model() -> ImageClassifier:
    L.seed_everything(SEED, workers=True, verbose=False)
    model = ImageClassifier(
        "tf_efficientnet_lite0",
        ["a", "b"],
        source="timm",
        weights=None,
        unfreeze=0,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        scheduler="constant",
    )
    assert model.head_name == HEAD
    return model


def run_plain(data: CachedFeatures, epochs: int, out_dir: Path, device: torch.device) -> tuple[float, float]:
    model = new_model()
    network, head = model.network, model.network.get_submodule(model.head_name)
    dropout = model.head_input_dropout
    L.seed_everything(SEED, workers=True, verbose=False)
    started = time.perf_counter()
    network.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader()}
    best, val_acc = float("inf"), 0.0
    for epoch in range(epochs):
        loaders["train"].sampler.set_epoch(epoch)
        head.train()
        running_loss, correct = 0.0, 0
        for features, labels in loaders["train"]:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = head(nn.functional.dropout(features, dropout, training=True))
            loss = criterion(logits, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
        head.eval()
        val_loss, val_correct = 0.0, 0
        with torch.no_grad():
            for features, labels in loaders["val"]:
                features, labels = features.to(device), labels.to(device)
                logits = head(features)
                val_loss += criterion(logits, labels).item() * len(labels)
                val_correct += (logits.argmax(1) == labels).sum().item()
        val_acc = val_correct / VAL
        if val_loss < best:
            best = val_loss
            torch.save(network.state_dict(), out_dir / "best.pt")
    return finished(device) - started, val_acc


def run_ours(data: CachedFeatures, epochs: int, out_dir: Path, device: torch.device) -> tuple[float, float]:
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"trainer.max_epochs={epochs}",
                "trainer.enable_progress_bar=false",
                f"trainer.accelerator={accelerator}",
                "trainer.precision=32-true",  # the plain loop's
                "+trainer.enable_model_summary=false",
            ],
        )
    cfg.paths.output_dir = str(out_dir)
    OmegaConf.resolve(cfg)
    model = new_model()
    started = time.perf_counter()
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(cfg.logger))
    trainer.fit(model, datamodule=data)
    return finished(device) - started, float(trainer.callback_metrics["val/acc"])


def finished(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs instead of 20")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for an idle machine")
    add_smoke_argument(parser)
    args = parser.parse_args()
    epochs = 1 if args.smoke else 5 if args.quick else 20
    if args.smoke:
        args.repeats, args.max_wait = 1, -1
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(SEED)
    rule = torch.randn(FEATURES, generator=generator)
    data = CachedFeatures(synthetic_features(TRAIN, generator, rule), synthetic_features(VAL, generator, rule))
    steps = epochs * -(-TRAIN // BATCH)
    print(
        f"# python bench/step_overhead.py {' '.join(sys.argv[1:])}\n# {today()}; {machine(device)}; "
        f"finetune {revision()}\n# {TRAIN} / {VAL} cached feature vectors of {FEATURES}, batch {BATCH}, "
        f"{epochs} epochs: {steps} training steps; load {wait_until_idle(args.max_wait):.2f}"
    )
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for side, run in (("plain", run_plain), ("ours", run_ours)):
                out_dir = Path(scratch) / f"{side}-{repeat}"
                out_dir.mkdir()
                seconds, val_acc = run(copy.copy(data), epochs, out_dir, device)
                times[side].append(seconds)
                print(
                    f"  {side:5} repeat {repeat}: {seconds:.2f} s ({1000 * seconds / steps:.2f} ms a step), "
                    f"val acc {val_acc:.4f}",
                    flush=True,
                )
    plain, ours = statistics.median(times["plain"]), statistics.median(times["ours"])
    print(f"plain {plain:.2f} s, ours {ours:.2f} s (medians of {args.repeats})")
    print(f"overhead {1000 * (ours - plain) / steps:.2f} ms a step, ratio {ours / plain:.2f}")


if __name__ == "__main__":
    main()
