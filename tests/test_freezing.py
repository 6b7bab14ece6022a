"""Frozen blocks stay frozen through real training steps: weights, BatchNorm statistics, dropout."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import UsageError
from finetune.model.module import ImageClassifier


def train_a_few_steps(image_folder, **options) -> tuple[ImageClassifier, dict, dict]:
    L.seed_everything(0)
    model = ImageClassifier("mobilenet_v2", ["circle", "square", "stripes"], weights=None, image_size=32, **options)
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    datamodule = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0, image_size=32)
    datamodule.prepare_data()
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=datamodule)
    return model, before, model.network.state_dict()


def changed(before: dict, after: dict, prefix: str, suffix: str) -> list[str]:
    return [k for k in before if k.startswith(prefix) and k.endswith(suffix) and not torch.equal(before[k], after[k])]


def test_frozen_blocks_keep_weights_and_batchnorm_statistics(image_folder):
    model, before, after = train_a_few_steps(image_folder, unfreeze=2)
    for block in range(17):
        prefix = f"features.{block}."
        assert not changed(before, after, prefix, ""), f"features.{block} changed"
    # The unfrozen blocks did learn, statistics included.
    assert changed(before, after, "features.18.", "weight")
    assert changed(before, after, "features.17.", "running_mean")
    assert changed(before, after, "classifier.1.", "weight")


def test_train_bn_lets_frozen_batchnorm_adapt(image_folder):
    model, before, after = train_a_few_steps(image_folder, unfreeze=2, train_bn=True)
    assert changed(before, after, "features.3.", "running_mean")
    assert changed(before, after, "features.3.", "weight")  # BatchNorm's affine weight
    convolutions = [k for k in before if k.startswith("features.3.") and after[k].dim() == 4]
    assert convolutions and not any(not torch.equal(before[k], after[k]) for k in convolutions)


def test_train_mode_leaves_frozen_blocks_in_eval_mode():
    model = ImageClassifier("vit_b_16", ["a", "b"], weights=None, unfreeze=1)
    model.train()
    layers = model.network.encoder.layers
    assert not layers.encoder_layer_0.training and not layers.encoder_layer_10.training
    assert layers.encoder_layer_11.training and model.network.heads.training
    dropouts = [m for m in layers.encoder_layer_0.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)


def test_bn_eval_keeps_the_statistics_of_trainable_blocks_while_their_weights_train(image_folder):
    model, before, after = train_a_few_steps(image_folder, unfreeze=2, bn_eval=True)
    assert not changed(before, after, "", "running_mean") and not changed(before, after, "", "running_var")
    assert changed(before, after, "features.17.", "weight")  # convolutions and BatchNorm scales still learn
    batchnorms = [m for m in model.network.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    assert batchnorms and not any(m.training for m in batchnorms)
    assert model.network.classifier.training  # the head's dropout still trains


def test_bn_eval_and_train_bn_contradict_each_other():
    with pytest.raises(UsageError, match="train_bn=true and bn_eval=true"):
        ImageClassifier("mobilenet_v2", ["a", "b"], weights=None, train_bn=True, bn_eval=True)
