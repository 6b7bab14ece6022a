"""What the README claims about training, each through the real command line, each able to fail.

Every test here was checked against its feature broken (the report of issue 13 lists how): a test that passes
with the feature broken claims nothing.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
import yaml
from conftest import REPO, TINY, make_image_folder, run_cli, run_cli_in_process
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData


def assert_one_line_error(result, *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error: " in line]  # printed, or logged by train.py
    assert len(errors) == 1, output[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.slow
def test_a_run_whose_best_epoch_is_not_the_last_reports_the_best_checkpoint(tmp_path, image_folder):
    # The last epoch's validation gets every image wrong (tests/faults.py), so an earlier epoch is the best.
    run_cli(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=3",
        "+callbacks.wrong._target_=faults.WrongInLastValidation",
    )
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    logged = {name: [point.value for point in events.Scalars(name)] for name in ("val/acc", "val/loss")}
    assert len(logged["val/acc"]) == 3 and logged["val/acc"][2] == 0.0
    best = metrics["best_epoch"]
    assert best < 2
    # The reported validation scores are the best epoch's, not the last's.
    assert metrics["val/acc"] == pytest.approx(logged["val/acc"][best], abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(logged["val/loss"][best], abs=1e-5)
    # And the test scores are those of the same weights: the best checkpoint, tested again here.
    from finetune.model.module import ImageClassifier

    checkpoint = next((run / "checkpoints").glob("epoch*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["epoch"] == best
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = ImageClassifier.from_checkpoint(str(checkpoint))
    assert any(
        not torch.equal(value, last[name])
        for name, value in model.state_dict().items()
        if name in last and value.is_floating_point()
    )
    assert metrics["test/acc"] == pytest.approx(_test_accuracy(model, run, image_folder), abs=1e-6)


def _test_accuracy(model, run, root) -> float:
    """Accuracy of `model` on the run's test images, with the preprocessing its checkpoint records."""
    import csv

    from PIL import Image

    from finetune.data.transforms import eval_transform

    transform = eval_transform(model.preprocessing)
    with open(run / "split.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["split"] == "test"]
    model.eval()
    correct = 0
    with torch.no_grad():
        for row in rows:
            path = root / row["path"]  # split.csv names images relative to data.root
            image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            correct += int(model(image).argmax(1).item() == model.class_names.index(row["class"]))
    return correct / len(rows)


@pytest.mark.slow
def test_plateau_lowers_the_learning_rate_when_val_loss_stalls(tmp_path, image_folder):
    # At a learning rate of 1e-6 the validation loss cannot improve by ReduceLROnPlateau's threshold (a relative
    # 1e-4): after patience (2) epochs without improvement, the end of the fourth lowers the rate tenfold. (Not
    # 1e-9: the scheduler ignores reductions smaller than its eps, 1e-8.)
    run_cli(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "unfreeze=0",
        "strategy.scheduler=plateau",
        "strategy.lr=1e-6",
        "trainer.max_epochs=5",
    )
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    rates = [group["lr"] for group in saved["optimizer_states"][0]["param_groups"]]
    assert rates == [pytest.approx(1e-7)]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    curve = [point.value for point in events.Scalars(next(t for t in events.Tags()["scalars"] if "lr" in t))]
    assert curve == pytest.approx([1e-6] * 4 + [1e-7])  # logged at each epoch's start


@pytest.mark.slow
def test_balance_sampler_draws_every_class_equally_often_through_the_cli(tmp_path):
    # 30, 10 and 5 images: 21/7/3 train images, 67% / 23% / 10% of the draws without balancing.
    data = tmp_path / "data"
    make_image_folder(data, per_class=30)
    for kind, keep in (("square", 10), ("stripes", 5)):
        for path in sorted((data / kind).iterdir())[keep:]:
            path.unlink()
    labels = tmp_path / "labels.txt"
    run_cli(
        tmp_path,
        *TINY,
        f"data.root={data}",
        "unfreeze=0",
        "data.balance=sampler",
        "trainer.max_epochs=6",
        "+callbacks.record._target_=faults.RecordLabels",
        f"+callbacks.record.path={labels}",
    )
    drawn = Counter(int(label) for line in labels.read_text().split() for label in line.split())
    total = sum(drawn.values())
    assert total == 31 * 6
    for label in range(3):  # a third each (62): binomial standard deviation 6.4; unbalanced, 126 / 42 / 18
        assert abs(drawn[label] - total / 3) < 25, drawn


def test_balance_loss_weights_weighs_the_training_loss_as_the_class_counts_say(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, per_class=20)
    for path in sorted((data / "stripes").iterdir())[5:]:
        path.unlink()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*TINY, f"data.root={data}", "data.balance=loss_weights", "paths.output_dir=."]
        )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    counts = datamodule.class_counts()
    assert counts == [14, 14, 3]
    model = instantiate(cfg.model, class_names=datamodule.class_names, class_weights=datamodule.loss_weights())
    # By hand: class c weighs n / (k n_c); the loss is the weighted mean of the per-image cross-entropies.
    weights = [31 / (3 * 14), 31 / (3 * 14), 31 / (3 * 3)]
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.5]])
    labels = torch.tensor([0, 1, 2, 2])
    log_probabilities = logits.log_softmax(dim=1)
    losses = [-log_probabilities[i, labels[i]].item() for i in range(4)]
    expected = sum(weights[c] * loss for c, loss in zip(labels.tolist(), losses, strict=True)) / sum(
        weights[c] for c in labels.tolist()
    )
    assert model.training_loss_fn(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert model.loss(logits, labels).item() == pytest.approx(sum(losses) / 4, rel=1e-6)  # val/test: unweighted
    assert expected != pytest.approx(sum(losses) / 4, rel=1e-3)


@pytest.mark.slow
def test_lr_find_trains_at_the_suggested_rate_and_records_it(tmp_path, image_folder):
    result = run_cli(
        tmp_path,
        *TINY,
        f"data.root={image_folder}",
        "tune.lr_find=true",
        "tune.num_training=20",
        "strategy=gradual",
        "strategy.scheduler=constant",
        "trainer.max_epochs=3",
    )
    output = result.stdout + result.stderr
    found = float(output.split("learning-rate finder: lr ")[1].split()[0])
    run = tmp_path / "run"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    rates = {group["name"]: group["lr"] for group in saved["optimizer_states"][0]["param_groups"]}
    suggestion = saved["hyper_parameters"]["lr"]
    assert suggestion == pytest.approx(found, rel=1e-2)  # the log shows 3 significant digits
    assert rates["head"] == suggestion
    assert rates["backbone"] == pytest.approx(suggestion * 1e-4 / 1e-3)  # gradual's backbone:head ratio kept
    # The rates it chose are in metrics.json; Hydra's record keeps what the user asked for.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["lr_find/lr"] == suggestion
    assert metrics["lr_find/backbone_lr"] == pytest.approx(suggestion * 0.1)
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert (config["strategy"]["lr"], config["strategy"]["backbone_lr"]) == (1e-3, 1e-4)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["lr"].number_value == pytest.approx(suggestion)


@pytest.mark.slow
def test_strategy_full_trains_every_parameter_with_the_backbone_at_a_tenth(tmp_path, image_folder):
    run_cli(tmp_path, *TINY, f"data.root={image_folder}", "strategy=full", "trainer.max_epochs=1")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params/trainable"] == metrics["params/total"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    groups = {group["name"]: group for group in saved["optimizer_states"][0]["param_groups"]}
    assert groups["head"]["initial_lr"] == 1e-3 and groups["backbone"]["initial_lr"] == 1e-4
    assert sum(len(group["params"]) for group in groups.values()) == len(
        [
            key
            for key in saved["state_dict"]
            if key.startswith("network.") and "running" not in key and "num_batches_tracked" not in key
        ]
    )


def test_trainer_gpu_composes():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and cfg.trainer.max_epochs == 10


def test_a_split_that_leaves_a_class_without_training_images_stops_with_one_line(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, per_class=4)
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", "data.split=[0.2,0.4,0.4]", check=False)
    assert_one_line_error(result, "class 'circle' has 4 image(s)", "none to train")


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_a_model_group_without_a_name_stops_with_one_line(tmp_path, image_folder, source):
    result = run_cli_in_process(tmp_path, f"model={source}", f"data.root={image_folder}", check=False)
    assert_one_line_error(result, "model.name", f"model={source} model.name=")


@pytest.mark.parametrize("kind", ["code", "truncated"])
def test_a_checkpoint_torch_will_not_load_stops_the_resume_with_one_line(tmp_path, image_folder, kind):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if kind == "code":
        torch.save({"state_dict": {}, "hook": os.system}, path)  # unpickling it would reach os.system
        expected = "a pickle that may run code"
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
        expected = f"cannot resume from {path}"
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", "ckpt_path=last", check=False)
    assert_one_line_error(result, expected, "ckpt_path=")
