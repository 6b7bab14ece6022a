"""model.compile: a compiled network trains the same parameters as an eager one, keeps frozen blocks frozen and in
eval mode (through a gradual schedule too), and writes checkpoints with plain key names that load uncompiled."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch._inductor.config

import finetune.training.callbacks
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import UsageError
from finetune.model.module import ImageClassifier

CLASSES = ["circle", "square", "stripes"]


class Modes(L.Callback):
    """The modules in train mode at the first step of every epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, set[str]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if batch_index == 0:
            self.by_epoch[trainer.current_epoch] = {n for n, m in module.network.named_modules() if m.training}


def fit(image_folder, tmp_path, compile, epochs=2, **options) -> tuple[ImageClassifier, dict, Modes, L.Trainer]:
    L.seed_everything(0)
    # NCHW on both sides: channels_last=auto picks NHWC for eager CPU runs only, and another layout sums in another
    # order (differences of 1e-4 after training), which is not what this compares.
    model = ImageClassifier(
        "mobilenet_v2",
        CLASSES,
        weights=None,
        image_size=32,
        scheduler="constant",
        compile=compile,
        channels_last=False,
        **options,
    )
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    data = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0, image_size=32)
    data.prepare_data()
    modes = Modes()
    # Validation at the end only: each new state (train or eval mode, depth) is one more compilation.
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[modes],
    )
    trainer.fit(model, datamodule=data)
    return model, before, modes, trainer


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_load_uncompiled(image_folder, tmp_path, monkeypatch):
    # aot_eager traces forward and backward as inductor does, without generating code: seconds, not minutes.
    monkeypatch.setattr(finetune.training.callbacks, "COMPILE_BACKEND", "aot_eager")
    gradual = {"unfreeze": 2, "unfreeze_epoch": 1}  # the blocks' requires_grad changes between epochs
    eager, before, eager_modes, eager_trainer = fit(image_folder, tmp_path / "eager", False, **gradual)
    compiled, _, compiled_modes, trainer = fit(image_folder, tmp_path / "compiled", True, **gradual)
    assert compiled.network._compiled_call_impl is not None and eager.network._compiled_call_impl is None
    # Validation ran compiled, in eval mode, and scored the same.
    for metric in ("val/loss", "val/acc"):
        assert float(trainer.callback_metrics[metric]) == pytest.approx(
            float(eager_trainer.callback_metrics[metric]), abs=1e-5
        )

    after_eager, after_compiled = eager.network.state_dict(), compiled.network.state_dict()
    assert after_eager.keys() == after_compiled.keys()
    for key in after_eager:
        assert torch.allclose(after_eager[key].float(), after_compiled[key].float(), atol=1e-5), key
    # The unfrozen blocks trained, the frozen ones (weights and BatchNorm statistics) did not.
    assert not torch.equal(before["features.17.conv.0.0.weight"], after_compiled["features.17.conv.0.0.weight"])
    assert all(torch.equal(before[k], after_compiled[k]) for k in before if k.startswith("features.16."))
    assert compiled_modes.by_epoch == eager_modes.by_epoch
    assert compiled_modes.by_epoch[0] != compiled_modes.by_epoch[1]  # unfrozen blocks joined in train mode

    checkpoint = trainer.checkpoint_callback.best_model_path
    keys = torch.load(checkpoint, weights_only=True)["state_dict"].keys()
    assert not any("_orig_mod" in key for key in keys) and "network.features.17.conv.0.0.weight" in keys
    loaded = ImageClassifier.from_checkpoint(checkpoint).eval()
    assert loaded.network._compiled_call_impl is None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(images), eager.eval()(images), atol=1e-5)


def test_unknown_compile_mode_names_the_valid_ones():
    with pytest.raises(UsageError, match="use false, true or a torch.compile mode .*max-autotune"):
        ImageClassifier("mobilenet_v2", CLASSES, weights=None, compile="fastest")


@pytest.mark.slow
def test_inductor_compiled_steps_train_what_eager_steps_train(image_folder):
    # The real backend on this CPU (code generation for forward and backward: about half a minute). Full batches
    # only, no validation: one compilation. Inductor draws dropout masks from its own generator unless told to use
    # eager's; at 32 px the last blocks see 1x1 maps, whose BatchNorm over 8 values amplifies rounding: 64 px.
    # config.patch, not monkeypatch: undoing a setattr on torch's config module deletes the key for good.
    results = []
    for compile in (False, True):
        L.seed_everything(0)
        # SGD: an update proportional to the gradient (Adam's first steps amplify rounding-level differences).
        model = ImageClassifier(
            "mobilenet_v2",
            CLASSES,
            weights=None,
            image_size=64,
            unfreeze=2,
            optimizer="sgd",
            lr=0.01,
            compile=compile,
            channels_last=False,
        )  # NCHW on both sides, as in fit() above
        initial = {k: v.clone() for k, v in model.network.state_dict().items()}
        data = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0, image_size=64)
        data.prepare_data()
        trainer = L.Trainer(
            max_steps=3,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        with torch._inductor.config.patch(fallback_random=True):
            trainer.fit(model, datamodule=data)
        results.append(model.network.state_dict())
    trained = [
        k for k in results[0] if k.startswith(("features.17.", "features.18.", "classifier.")) and k.endswith("weight")
    ]
    assert trained and all(not torch.equal(initial[k], results[1][k]) for k in trained)
    for key in trained:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-5, rtol=1e-4), key
