"""Parity: the tutorials' plain PyTorch training loop against finetune's pipeline, on identical work.

Both sides train the same network (EfficientNet-Lite0 with the packaged ImageNet weights, unfreeze=2, AdamW at
lr 1e-3 and weight decay 1e-4 as strategy=finetune, constant learning rate), from the same initial weights, on
the same data loaders (`finetune.data.datamodule.ImageFolderDataModule`: same split, batch size, workers, augmentation),
for the same epochs, with the same seed, in this one process:

- plain: model.train() (frozen blocks back to eval mode), per batch zero_grad / forward / loss / backward /
  step with the running loss and accuracy of the tutorials; then a no_grad validation pass (loss, accuracy);
  the best state_dict by validation loss saved with torch.save.
- ours: `lightning.Trainer` with the trainer settings, callbacks (checkpoints, learning-rate monitor) and logger
  (TensorBoard) instantiated from the real conf/ with hydra.compose, as `python train.py` does, around
  `finetune.model.module.ImageClassifier` (torchmetrics metrics, logging); the sanity check (conf/trainer: 1 validation
  batch) is on, as in a real run, and counted. `--override` changes our side only, to find where time goes.

Timed: the training alone (plain: its loop; ours: Trainer construction + `trainer.fit`); building the model
(loading the weights) is outside, on both sides. Sides run plain, ours, ours, plain, ... (`--repeats`); the
figures are medians. The last line is `ratio X`: our total time / the plain loop's.

    python bench/parity.py --quick          # ~2 min on a 2-core CPU: 600 images (300 per class) at 112 px, 2 epochs
    python bench/parity.py                  # the whole ELPV set at 224 px, 3 epochs, 2 repeats (~20 min there)
    python bench/parity.py --smoke          # seconds, on tiny generated images: that it runs, not a measurement

The CPU may be shared: the script waits for a load average <= 1.5 first, and measures again any run during which
other processes used the CPU (`--max-wait`, `--retries`); each run's load and other processes' CPU use are printed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
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
from lightning.fabric.utilities.seed import pl_worker_init_function
from omegaconf import OmegaConf
from torch import nn

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.demo import demo_root
from finetune.model.backbones import create_backbone
from finetune.model.freezing import apply_unfreeze, keep_frozen_in_eval_mode
from finetune.model.module import ImageClassifier
from finetune.training.callbacks import prefers_channels_last
from finetune.training.loggers import instantiate_loggers

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED = 42
UNFREEZE = 2
LR = 1e-3  # strategy=finetune: head and blocks at 1e-3
WEIGHT_DECAY = 1e-4  # the strategy's default, AdamW (decoupled)

# As train.py: frozen blocks are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*The number of training batches.*")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a subset (--per-class images of each class) at 112 px for 2 epochs"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--repeats", type=int, default=2, help="plain/ours pairs (default 2)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3; --quick 2")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (the weights'); --quick 112")
    parser.add_argument(
        "--per-class", type=int, default=None, help="use the first N images of each class (default: all; --quick 300)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="an image folder (one sub-folder per class) instead of the ELPV demo, e.g. a copy "
        "of it on a machine without the elpv-dataset package",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the data module's (cores - 1)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for our side only, to find where time goes, "
        "e.g. trainer.num_sanity_val_steps=0 (then it is not the real pipeline)",
    )
    add_idle_arguments(parser, "run")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.epochs, args.image_size, args.batch_size = 1, 1, 32, 8
        args.num_workers, args.max_wait, args.retries = 0, -1, 0
    repeats = args.repeats
    epochs = args.epochs or (2 if args.quick else 3)
    image_size = args.image_size or (112 if args.quick else 224)
    per_class = args.per_class or (300 if args.quick else None)
    device = resolve_device(args.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="finetune-parity-"))
    try:
        if args.smoke:
            root = smoke_images(work / "data")
        else:
            root = Path(args.data_root).expanduser() if args.data_root else demo_root("elpv")
        if per_class and not args.smoke:
            root = subset(root, work / "data", per_class)
        command = " ".join(["python", "bench/parity.py", *sys.argv[1:]])
        print(f"# {command}\n# {today()}; {machine(device)}; finetune {revision()}")
        print(
            f"# data {root} ({f'first {per_class} per class' if per_class else 'all'}), image size "
            f"{image_size}, batch {args.batch_size}, {epochs} epochs, {repeats} repeat(s), seed {SEED}; "
            f"tf_efficientnet_lite0 unfreeze={UNFREEZE}, AdamW lr {LR:g} wd {WEIGHT_DECAY:g}, constant lr"
        )
        bench = Parity(root, work, device, epochs, image_size, args.batch_size, args.num_workers, args.override)
        bench.max_wait, bench.retries = args.max_wait, args.retries
        bench.check_same_setup()
        bench.warm_up()
        idle = wait_until_idle(args.max_wait)
        print(f"# load average before measuring: {idle:.2f}")
        runs: dict[str, list[dict]] = {"plain": [], "ours": []}
        for repeat in range(repeats):
            # plain, ours, ours, plain, ...: this machine drifts within a session (a side run second was up to
            # 12% slower), and alternating the order cancels a steady drift out of the medians.
            for side in ("plain", "ours") if repeat % 2 == 0 else ("ours", "plain"):
                result = bench.measure(side, tag=f"{side}-{repeat}")
                runs[side].append(result)
                phase = {name: sum(e[name] for e in result["epochs"]) for name in ("train", "val", "after_val")}
                print(
                    f"  {side:5} repeat {repeat}: {result['total_s']:.2f} s = before epoch 1 "
                    f"{result['before_epochs_s']:.2f} (sanity {result['sanity_s']:.2f}) + train {phase['train']:.2f}"
                    f" + val {phase['val']:.2f} + after val {phase['after_val']:.2f}; val acc "
                    f"{result['val_acc']:.4f}; load {result['load_start']:.2f}, other processes "
                    f"{result['other_cores']:.2f} cores",
                    flush=True,
                )
        bench.check_modes(runs)
        report(runs, epochs, bench.train_images, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Parity:
    def __init__(
        self,
        root: Path,
        work: Path,
        device: torch.device,
        epochs: int,
        image_size: int,
        batch_size: int,
        num_workers: int | None,
        extra_overrides: list[str],
    ) -> None:
        self.work = work
        self.device = device
        self.epochs = epochs
        self.image_size = image_size
        self.overrides = [
            "model=efficientnet_lite0",
            f"unfreeze={UNFREEZE}",
            "strategy=finetune",
            "strategy.scheduler=constant",
            f"strategy.lr={LR}",
            f"strategy.weight_decay={WEIGHT_DECAY}",
            "strategy.optimizer=adamw",
            # The plain loop runs the frozen blocks every step: so must ours (feature_cache.py measures the cache).
            "strategy.cache_features=false",
            f"seed={SEED}",
            f"data.root={root}",
            f"data.image_size={image_size}",
            f"data.batch_size={batch_size}",
            f"trainer.max_epochs={epochs}",
            "trainer.enable_progress_bar=false",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "trainer.precision=32-true",  # the plain loop's
        ]
        if num_workers is not None:
            self.overrides.append(f"data.num_workers={num_workers}")
        self.overrides += extra_overrides
        if extra_overrides:
            print(f"# our side with extra overrides (not the real pipeline): {' '.join(extra_overrides)}")
        cfg = self.config(work / "probe")
        # One data module for both sides: the same split, transforms and loader settings.
        self.datamodule: ImageFolderDataModule = instantiate(cfg.data)
        self.datamodule.prepare_data()
        self.class_names = self.datamodule.class_names
        self.model_cfg = cfg.model
        self.train_images = len(self.datamodule.splits["train"])
        self.val_images = len(self.datamodule.splits["val"])
        print(
            f"# split: {self.train_images} train / {self.val_images} val images, "
            f"{self.datamodule.num_workers} loader worker(s), "
            f"{math.ceil(self.train_images / batch_size)} + {math.ceil(self.val_images / batch_size)} "
            "batches per epoch"
        )

    def config(self, output_dir: Path):
        """The composed configuration with its outputs in `output_dir`; composed once, so every run of this
        process uses the same configuration (as it uses the code imported at its start)."""
        if not hasattr(self, "_composed"):
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                self._composed = compose("train", overrides=self.overrides)
        cfg = copy.deepcopy(self._composed)
        cfg.paths.output_dir = str(output_dir)
        OmegaConf.resolve(cfg)
        return cfg

    # The two networks -----------------------------------------------------------------------------------------

    def our_model(self) -> ImageClassifier:
        model: ImageClassifier = instantiate(self.model_cfg, class_names=self.class_names)
        self.datamodule.preprocessing = model.preprocessing
        return model

    def plain_network(self) -> tuple[nn.Module, list]:
        """As a tutorial would: build, replace the head, freeze all but the last blocks, move to the device."""
        cfg = self.model_cfg
        backbone = create_backbone(cfg.name, len(self.class_names), source=cfg.source, weights=cfg.weights)
        frozen = apply_unfreeze(backbone.network, backbone.blocks, backbone.head_name, UNFREEZE)
        # At the size ours is fed (data.image_size), as the DataModule checks.
        self.datamodule.preprocessing = backbone.preprocessing.at_size(self.image_size)
        return backbone.network, frozen

    def check_same_setup(self) -> None:
        """Same initial weights, same trainable parameters, same modules in train mode after .train()."""
        L.seed_everything(SEED, workers=True, verbose=False)
        ours = self.our_model()
        L.seed_everything(SEED, workers=True, verbose=False)
        plain, frozen = self.plain_network()
        ours_state, plain_state = ours.network.state_dict(), plain.state_dict()
        same_weights = ours_state.keys() == plain_state.keys() and all(
            torch.equal(ours_state[k], plain_state[k]) for k in ours_state
        )
        trainable = {n for n, p in ours.network.named_parameters() if p.requires_grad}
        same_trainable = trainable == {n for n, p in plain.named_parameters() if p.requires_grad}
        ours.train()
        plain.train()
        keep_frozen_in_eval_mode(plain, frozen)
        same_modes = training_modules(ours.network) == training_modules(plain)
        print(
            f"# same initial weights: {same_weights}; same trainable parameters ({len(trainable)} tensors, "
            f"{sum(p.numel() for p in plain.parameters() if p.requires_grad):,} values): {same_trainable}; "
            f"same modules in train mode ({len(training_modules(plain))} of {len(list(plain.modules()))}): "
            f"{same_modes}"
        )
        if not (same_weights and same_trainable and same_modes):
            raise SystemExit("the two sides do not start from the same setup")

    def warm_up(self) -> None:
        """Untimed, so first-call costs land on neither side: every batch shape of the run (the last, partial
        batches too: a new shape can cost kernel selection on its first call) through the network, training and
        evaluating, on synthetic images; then one train and one validation batch through each side's loop."""
        started = time.perf_counter()
        network, frozen = self.plain_network()
        network.to(self.device)
        channels_last = prefers_channels_last(network, self.device)  # as ours does (model.channels_last=auto)
        if channels_last:
            network.to(memory_format=torch.channels_last)
        size, crop = self.datamodule.batch_size, self.datamodule.preprocessing.at_size(self.image_size).crop_size
        shapes = {size, self.train_images % size or size, self.val_images % size or size}
        for batch in sorted(shapes):
            images = torch.randn(batch, 3, crop, crop, device=self.device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            network.train()
            keep_frozen_in_eval_mode(network, frozen)
            network(images).sum().backward()
            network.eval()
            with torch.no_grad():
                network(images)
            with torch.inference_mode():
                network(images)
        del network
        self.run_plain(limit_batches=1)
        self.run_ours(self.work / "warm-up", limit_batches=1)
        print(f"# warm-up (batch sizes {sorted(shapes)}; one batch per side): {time.perf_counter() - started:.1f} s")

    # One measurement --------------------------------------------------------------------------------------------

    def measure(self, side: str, tag: str) -> dict:
        """One timed run; run again (up to `retries` times) if other processes used the CPU meanwhile."""
        for attempt in range(self.retries + 1):
            wait_until_idle(self.max_wait, use_load=False)
            release_memory()
            with ResourceSampler(self.device) as sampler:
                result = self.run_plain() if side == "plain" else self.run_ours(self.work / f"{tag}-{attempt}")
            result.update(sampler.result())
            result["attempts"] = attempt + 1
            result["busy"] = result["other_cores"] >= QUIET_CORES and self.device.type != "cuda"
            if not result["busy"]:
                break
            print(
                f"  ({side}: other processes used {result['other_cores']:.2f} cores meanwhile "
                f"({result['total_s']:.1f} s): {'again' if attempt < self.retries else 'kept, flagged busy'})",
                flush=True,
            )
        return result

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run_plain(self, limit_batches: int | None = None) -> dict:
        L.seed_everything(SEED, workers=True, verbose=False)
        network, frozen = self.plain_network()
        out_dir = Path(tempfile.mkdtemp(dir=self.work, prefix="plain-"))
        started = self._sync()
        device = self.device
        channels_last = prefers_channels_last(network, device)  # as ours does by default (model.channels_last=auto)
        network.to(device)
        if channels_last:
            network.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(
            [p for p in network.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
        )
        criterion = nn.CrossEntropyLoss()
        self.datamodule.setup("fit")
        loaders = {"train": self.datamodule.train_dataloader(), "val": self.datamodule.val_dataloader()}
        for loader in loaders.values():  # what Lightning adds after seed_everything(workers=True)
            loader.worker_init_fn = partial(pl_worker_init_function, rank=0)
        epochs, best_loss, modes = [], math.inf, None
        val_acc = 0.0
        for epoch in range(1 if limit_batches else self.epochs):
            epoch_start = self._sync()
            sampler = loaders["train"].sampler
            if hasattr(sampler, "set_epoch"):  # as Lightning does each epoch (a per-epoch shuffle, if any)
                sampler.set_epoch(epoch)
            network.train()
            keep_frozen_in_eval_mode(network, frozen)
            running_loss, correct, seen = 0.0, 0, 0
            for index, (images, labels) in enumerate(loaders["train"]):
                if limit_batches and index >= limit_batches:
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if modes is None:
                    modes = training_modules(network)
                optimizer.zero_grad()
                logits = network(images)
                loss = criterion(logits, labels)
                loss.backward()
                optimizer.step()
                running_loss += loss.item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
            train_end = self._sync()
            network.eval()
            val_loss, val_correct, val_seen = 0.0, 0, 0
            with torch.no_grad():
                for index, (images, labels) in enumerate(loaders["val"]):
                    if limit_batches and index >= limit_batches:
                        break
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    logits = network(images)
                    val_loss += criterion(logits, labels).item() * len(labels)
                    val_correct += (logits.argmax(1) == labels).sum().item()
                    val_seen += len(labels)
            val_end = self._sync()
            val_loss /= max(1, val_seen)
            val_acc = val_correct / max(1, val_seen)
            if val_loss < best_loss:
                best_loss = val_loss
                torch.save(network.state_dict(), out_dir / "best.pt")
            epoch_end = self._sync()
            epochs.append(
                {
                    "wall": epoch_end - epoch_start,
                    "train": train_end - epoch_start,
                    "val": val_end - train_end,
                    "after_val": epoch_end - val_end,
                }
            )
        loaders.clear()  # shuts the persistent workers down, as Lightning's teardown does inside fit
        total = self._sync() - started
        return {
            "total_s": total,
            "epochs": epochs,
            "val_acc": val_acc,
            "modes": modes,
            "before_epochs_s": total - sum(e["wall"] for e in epochs),
            "sanity_s": 0.0,
        }

    def run_ours(self, output_dir: Path, limit_batches: int | None = None) -> dict:
        L.seed_everything(SEED, workers=True, verbose=False)
        cfg = self.config(output_dir)
        model = self.our_model()
        timer = PhaseTimer(self._sync)
        started = self._sync()
        callbacks = [instantiate(callback) for callback in (cfg.get("callbacks") or {}).values()]
        extra = {}
        if limit_batches:
            extra = {
                "max_epochs": 1,
                "limit_train_batches": limit_batches,
                "limit_val_batches": limit_batches,
                "num_sanity_val_steps": 0,
            }
        # As train.py builds them (conf/logger holds a dict of loggers); ~logger: none, to find its cost.
        logger = instantiate_loggers(cfg.logger) if cfg.get("logger") else False
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, timer], logger=logger, **extra)
        constructed = self._sync()
        trainer.fit(model, datamodule=self.datamodule)
        total = self._sync() - started
        epochs = timer.epochs()
        return {
            "total_s": total,
            "epochs": epochs,
            "val_acc": float(trainer.callback_metrics["val/acc"]),
            "modes": timer.modes,
            "sanity_s": timer.sanity,
            "trainer_init_s": constructed - started,
            "before_epochs_s": total - sum(e["wall"] for e in epochs),
        }

    def check_modes(self, runs: dict[str, list[dict]]) -> None:
        plain, ours = runs["plain"][0]["modes"], runs["ours"][0]["modes"]
        print(
            f"# modules in train mode at the first training batch: plain {len(plain)}, ours {len(ours)}, "
            f"identical: {plain == ours}"
        )


def training_modules(network: nn.Module) -> set[str]:
    return {name for name, module in network.named_modules() if module.training}


class PhaseTimer(L.Callback):
    """Per-epoch wall times inside `trainer.fit`: an epoch runs from its start to the next epoch's (the last
    to the end of training), so checkpointing and logging at its end count; split into train, validation and
    what follows validation (checkpoints, epoch-end logging)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.marks: list[dict] = []
        self.sanity = 0.0
        self.modes = None
        self.train_end = None

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._sanity_start = self.clock()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.sanity = self.clock() - self._sanity_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append({"start": self.clock()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.modes is None:
            self.modes = training_modules(pl_module.network)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.marks[-1]["train_end"] = self.clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.marks[-1]["val_end"] = self.clock()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = self.clock()

    def epochs(self) -> list[dict]:
        result = []
        for index, mark in enumerate(self.marks):
            end = self.marks[index + 1]["start"] if index + 1 < len(self.marks) else self.end
            train_end = mark.get("train_end", end)
            val_end = mark.get("val_end", train_end)
            result.append(
                {
                    "wall": end - mark["start"],
                    "train": train_end - mark["start"],
                    "val": val_end - train_end,
                    "after_val": end - val_end,
                }
            )
        return result


def report(runs: dict[str, list[dict]], epochs: int, train_images: int, device: torch.device) -> None:
    def median(side: str, key) -> float:
        return statistics.median(key(run) for run in runs[side])

    rows = []
    for side in ("plain", "ours"):
        row = {"side": side}
        row["total"] = median(side, lambda r: r["total_s"])
        for epoch in range(epochs):
            row[f"epoch{epoch}"] = median(side, lambda r, e=epoch: r["epochs"][e]["wall"])
        row["train"] = median(side, lambda r: sum(e["train"] for e in r["epochs"]))
        row["val"] = median(side, lambda r: sum(e["val"] for e in r["epochs"]))
        row["after_val"] = median(side, lambda r: sum(e["after_val"] for e in r["epochs"]))
        row["before"] = median(side, lambda r: r["before_epochs_s"])
        row["sanity"] = median(side, lambda r: r["sanity_s"])
        row["images_s"] = train_images * epochs / row["total"]
        row["rss"] = median(side, lambda r: r["rss_peak_mib"])
        row["workers_rss"] = median(side, lambda r: r["workers_rss_peak_mib"])
        if device.type == "cuda":
            row["cuda"] = median(side, lambda r: r["cuda_peak_mib"])
        row["val_acc"] = median(side, lambda r: r["val_acc"])
        row["load"] = max(r["load_start"] for r in runs[side])
        row["other"] = max(r["other_cores"] for r in runs[side])
        rows.append(row)

    epoch_heads = [f"epoch {e + 1} s" for e in range(epochs)]
    memory_head = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    heads = ["side", "total s", *epoch_heads, "images/s", memory_head, "val acc"]
    print("\n| " + " | ".join(heads) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
    for row in rows:
        memory = row["cuda"] if device.type == "cuda" else row["rss"]
        cells = [
            row["side"],
            f"{row['total']:.1f}",
            *(f"{row[f'epoch{e}']:.1f}" for e in range(epochs)),
            f"{row['images_s']:.1f}",
            f"{memory:.0f}",
            f"{row['val_acc']:.4f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nwhere the time goes (medians, seconds; epochs = train + val + after val):")
    print("| side | before epoch 1 (of which sanity check) | train | val | after val (checkpoints, logging) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['side']} | {row['before']:.2f} ({row['sanity']:.2f}) | {row['train']:.2f} | "
            f"{row['val']:.2f} | {row['after_val']:.2f} |"
        )
    extra = []
    for row in rows:
        extra.append(
            f"{row['side']}: load at start <= {row['load']:.2f}, other processes <= {row['other']:.2f} "
            f"cores, loader workers' summed peak RSS {row['workers_rss']:.0f} MiB (shared pages counted "
            "in each)"
        )
    print("\n" + "\n".join(extra))
    plain, ours = rows
    busy = sum(r["busy"] for side in runs.values() for r in side)
    if busy:
        print(f"WARNING: {busy} measurement(s) ran while other processes used the CPU: the figures are not clean")
    print(f"(load average now {load():.2f})")
    print(
        f"plain {plain['total']:.1f} s, ours {ours['total']:.1f} s; val acc plain {plain['val_acc']:.4f}, "
        f"ours {ours['val_acc']:.4f}; ratio {ours['total'] / plain['total']:.3f}"
    )


if __name__ == "__main__":
    main()
