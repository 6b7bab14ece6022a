"""Strategies through real training: gradual unfreezing, discriminative learning rates, schedulers that cover
every group, the LR finder beside a gradual schedule, and resuming in the middle of one."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.tuner import Tuner

from finetune.data.datamodule import ImageFolderDataModule
from finetune.model.module import ImageClassifier

CLASSES = ["circle", "square", "stripes"]


class Recorder(L.Callback):
    """What trains, in which mode, in which optimizer groups, at the first step of every epoch."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if batch_index:
            return
        self.states[trainer.current_epoch] = {
            "trainable": {n for n, p in module.network.named_parameters() if p.requires_grad},
            "training_modules": {n for n, m in module.network.named_modules() if m.training},
            "groups": [(g["name"], g["lr"], len(g["params"])) for g in trainer.optimizers[0].param_groups],
        }


def model(**options) -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, **options)


def datamodule(image_folder, module: ImageClassifier) -> ImageFolderDataModule:
    data = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0, image_size=32)
    data.prepare_data()
    return data


class Interrupt(L.Callback):
    """Stops the run after `epochs` epochs, as a kill between epochs would (the schedule keeps its length)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit(
    image_folder, module: ImageClassifier, epochs: int, tmp_path=None, ckpt_path=None, stop_after: int | None = None
) -> Recorder:
    recorder = Recorder()
    callbacks = [recorder] + ([Interrupt(stop_after)] if stop_after else [])
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=tmp_path is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule(image_folder, module), ckpt_path=ckpt_path)
    return recorder


def prefixes(names: set[str]) -> set[str]:
    return {".".join(name.split(".")[:2]) for name in names}


def test_gradual_trains_the_head_first_then_more_blocks(image_folder):
    module = model(unfreeze=2, unfreeze_epoch=2, unfreeze_every=1, unfreeze_limit=3, backbone_lr=1e-4)
    states = fit(image_folder, module, epochs=5).states
    assert prefixes(states[0]["trainable"]) == prefixes(states[1]["trainable"]) == {"classifier.1"}
    assert prefixes(states[2]["trainable"]) == {"classifier.1", "features.17", "features.18"}
    assert prefixes(states[3]["trainable"]) == {"classifier.1", "features.16", "features.17", "features.18"}
    assert states[4]["trainable"] == states[3]["trainable"]  # unfreeze_limit=3
    # Frozen blocks stay in eval mode; unfrozen ones train.
    assert not any(name.startswith("features.17") for name in states[1]["training_modules"])
    assert any(name.startswith("features.17") for name in states[2]["training_modules"])
    # The groups exist from the first step, so no scheduler ever misses one.
    assert [(name, count) for name, _, count in states[0]["groups"]] == [("head", 2), ("backbone", 21)]
    assert all([g[:1] + g[2:] for g in state["groups"]] == [("head", 2), ("backbone", 21)] for state in states.values())


def test_layer_decay_gives_each_block_its_learning_rate():
    module = model(unfreeze=3, lr=1e-2, backbone_lr=1e-3, layer_decay=0.5, scheduler="constant")
    groups = {g["name"]: g["lr"] for g in module.parameter_groups()}
    assert groups == pytest.approx({"head": 1e-2, "block 18": 1e-3, "block 17": 5e-4, "block 16": 2.5e-4})


def test_cosine_with_warmup_scales_every_group_alike(image_folder):
    module = model(unfreeze=2, unfreeze_epoch=1, lr=1e-2, backbone_lr=1e-3, warmup_epochs=1)
    states = fit(image_folder, module, epochs=3).states
    # 2 steps an epoch, 6 in all: warmup over steps 0-1, then cosine over steps 2-5.
    for epoch, factor in ((0, 0.5), (1, 1.0), (2, 0.5)):
        (_, head_lr, _), (_, backbone_lr, _) = states[epoch]["groups"]
        assert (head_lr, backbone_lr) == pytest.approx((1e-2 * factor, 1e-3 * factor))


def test_reduce_on_plateau_runs_beside_a_gradual_schedule(image_folder):
    module = model(unfreeze=2, unfreeze_epoch=1, unfreeze_every=1, scheduler="plateau")
    states = fit(image_folder, module, epochs=3).states
    assert len(states) == 3 and len(states[2]["trainable"]) > len(states[0]["trainable"])


def test_lr_finder_works_with_a_gradual_schedule(image_folder):
    module = model(unfreeze=2, unfreeze_epoch=1, backbone_lr=1e-4)
    # 27 training images in batches of 8: 4 steps an epoch, 8 for the finder in 2 epochs.
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = datamodule(image_folder, module)
    finder = Tuner(trainer).lr_find(module, datamodule=data, num_training=8, early_stop_threshold=None)
    assert len(finder.results["lr"]) == 8 and finder.suggestion(skip_begin=1, skip_end=1) is not None
    trainer.fit(module, datamodule=data)  # and training goes on with the schedule intact
    assert module.depth == 2


def test_resume_mid_schedule_restores_state_and_groups(image_folder, tmp_path):
    options = {"unfreeze": 1, "unfreeze_epoch": 1, "unfreeze_every": 1, "backbone_lr": 1e-4}
    uninterrupted = fit(image_folder, model(**options), epochs=4).states
    fit(image_folder, model(**options), epochs=4, tmp_path=tmp_path, stop_after=2)
    resumed = fit(image_folder, model(**options), epochs=4, ckpt_path=str(tmp_path / "last.ckpt")).states
    assert sorted(resumed) == [2, 3]
    for epoch in (2, 3):
        assert resumed[epoch]["trainable"] == uninterrupted[epoch]["trainable"]
        assert resumed[epoch]["training_modules"] == uninterrupted[epoch]["training_modules"]
        assert [g[0] for g in resumed[epoch]["groups"]] == [g[0] for g in uninterrupted[epoch]["groups"]]
        assert [g[1] for g in resumed[epoch]["groups"]] == pytest.approx([g[1] for g in uninterrupted[epoch]["groups"]])
