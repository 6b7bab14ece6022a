"""`python -m finetune.evaluate`: metrics that agree with each other, the files written, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, run_module, run_module_in_process

from finetune.errors import UsageError
from finetune.evaluate import main
from finetune.inference.labelled import class_folder_images
from finetune.model.metrics import classification_metrics, predicted_confusion, predicted_macro_f1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`, with size and modification time: what 'only read' must preserve."""
    state = {}
    for directory, subdirectories, files in os.walk(folder):
        for name in [*subdirectories, *files]:
            status = os.stat(os.path.join(directory, name))
            state[os.path.relpath(os.path.join(directory, name), folder)] = (status.st_size, status.st_mtime_ns)
    return state


@pytest.mark.slow
def test_evaluates_a_labelled_folder(tmp_path, trained_run, image_folder):
    before = snapshot(image_folder)
    result = run_module(
        tmp_path,
        "finetune.evaluate",
        f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"data.root={image_folder}",
    )
    assert result.returncode == 0, result.stderr
    output = trained_run / "evaluation" / image_folder.name  # the default: in the run's folder
    assert f"written to {output}: metrics.json, per_class.csv, confusion_matrix.png" in result.stdout
    assert snapshot(image_folder) == before  # nothing written inside data.root

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["classes"] == list(CLASSES) and metrics["image_size"] == 32 and metrics["unreadable"] == {}
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert confusion.sum() == metrics["images"] == 36
    assert metrics["test/acc"] == pytest.approx(float(confusion.trace() / confusion.sum()))
    with open(output / "per_class.csv", newline="") as file:
        table = {row["class"]: row for row in csv.DictReader(file)}
    assert list(table) == list(CLASSES)
    f1s = []
    for label, name in enumerate(CLASSES):
        row, hits = metrics["per_class"][name], float(confusion[label, label])
        assert row["support"] == int(confusion[label].sum()) == 12 == int(table[name]["support"])
        assert row["recall"] == pytest.approx(hits / 12)
        predicted = float(confusion[:, label].sum())
        assert row["precision"] == pytest.approx(hits / predicted if predicted else 0.0)
        both = row["precision"] + row["recall"]
        assert row["f1"] == pytest.approx(2 * row["precision"] * row["recall"] / both if both else 0.0, abs=1e-6)
        for key in ("precision", "recall", "f1"):
            assert float(table[name][key]) == pytest.approx(row[key], abs=1e-6)
        f1s.append(row["f1"])
    assert metrics["test/f1"] == pytest.approx(sum(f1s) / len(f1s))  # every class is present
    assert (output / "confusion_matrix.png").read_bytes().startswith(PNG_SIGNATURE)
    # Trainer.test: the model's own metrics, under training's names; balanced accuracy is the mean recall.
    assert metrics["test/balanced_acc"] == pytest.approx(
        sum(row["recall"] for row in metrics["per_class"].values()) / len(CLASSES)
    )
    assert metrics["test/loss"] > 0
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran (no .hydra/, no log, no lightning_logs/)
    for name in CLASSES:
        assert name in result.stdout  # the printed table
    assert f"test/acc {metrics['test/acc']:.4f}, test/f1 {metrics['test/f1']:.4f}," in result.stdout
    assert "on 36 images" in result.stdout


def test_unknown_class_folder_is_a_one_line_error(tmp_path, trained_run, image_folder):
    data = tmp_path / "other"
    for name, source in (("circle", "circle"), ("triangle", "square")):
        (data / name).mkdir(parents=True)
        shutil.copy(image_folder / source / f"{source}_000.png", data / name / "a.png")
    output = tmp_path / "results"
    result = run_module_in_process(
        tmp_path,
        "finetune.evaluate",
        f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"data.root={data}",
        f"output={output}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {data} has classes the checkpoint does not know: triangle; it knows circle, square, stripes "
        "(a subset of them is fine)"
    )
    assert not output.exists()
    assert sorted(p.name for p in data.rglob("*")) == ["a.png", "a.png", "circle", "triangle"]


def test_a_subset_of_the_classes_is_fine(tmp_path, image_folder):
    data = tmp_path / "subset"
    (data / "square").mkdir(parents=True)
    shutil.copy(image_folder / "square" / "square_000.png", data / "square" / "x.png")
    (data / ".git").mkdir()  # hidden folders are no classes
    assert class_folder_images(data, list(CLASSES)) == [(str(data / "square" / "x.png"), 1)]
    with pytest.raises(UsageError, match="holds no class folders"):
        class_folder_images(data / "square", list(CLASSES))


def test_macro_f1_counts_the_classes_in_the_data_or_the_predictions():
    # Class 2 neither occurs nor is predicted: torchmetrics leaves it out of the macro average.
    predictions, targets = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    collection = classification_metrics(3, ["a", "b.x", "c"])
    collection.update(predictions, targets)
    metrics = {key: float(value) for key, value in collection.compute().items()}
    assert metrics["f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert metrics["balanced_acc"] == pytest.approx((1 + 2 / 3) / 2)  # mean recall over the classes seen
    # Per class (ClasswiseWrapper), keyed by the class name as it is (a dot included); 0 where undefined.
    assert metrics["precision_class/a"] == pytest.approx(0.5) and metrics["recall_class/a"] == 1.0
    assert metrics["precision_class/b.x"] == 1.0 and metrics["recall_class/b.x"] == pytest.approx(2 / 3)
    assert metrics["f1_class/b.x"] == pytest.approx(0.8)
    assert metrics["precision_class/c"] == metrics["recall_class/c"] == metrics["f1_class/c"] == 0.0
    assert not any("acc_class" in key for key in metrics)  # recall_class/<name> is each class's accuracy
    # What the study report computes from test_predictions.csv: the same numbers.
    assert predicted_macro_f1(targets, predictions, 3) == pytest.approx(metrics["f1"])
    assert predicted_confusion(targets, predictions, 3).tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]


def test_the_reports_macro_f1_is_the_test_steps_on_any_predictions():
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 3, 7):
        for _ in range(20):
            targets = torch.randint(
                0, classes, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator
            )
            predictions = torch.randint(0, classes, targets.shape, generator=generator)
            collection = classification_metrics(classes)
            collection.update(torch.nn.functional.one_hot(predictions, classes).float(), targets)  # as logits
            assert predicted_macro_f1(targets.numpy(), predictions.numpy(), classes) == pytest.approx(
                float(collection.compute()["f1"])
            )


def test_split_test_scores_the_runs_own_test_images(tmp_path, trained_run, capsys):
    # In process (the CLI path is covered above): the run's data.root and image size come from its config.
    assert (
        main(
            [
                f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}",
                "split=test",
                f"output={tmp_path / 'test'}",
                "num_workers=0",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["images"] == 3  # one test image per class
    # One epoch: the best checkpoint is the last; the training run tested it at the same 32 px. The same images
    # and weights: every test score the same, under the same key.
    tested = {key: value for key, value in trained.items() if key.startswith("test/")}
    assert {"test/acc", "test/f1", "test/recall_class/circle"} <= set(tested)
    assert {key: metrics[key] for key in tested} == pytest.approx(tested)
    for name in CLASSES:  # the per-class table is the test step's per-class scores
        for score in ("precision", "recall", "f1"):
            assert metrics["per_class"][name][score] == pytest.approx(tested[f"test/{score}_class/{name}"])


def test_results_never_go_inside_the_data_folder(tmp_path, trained_run, image_folder, capsys):
    inside = image_folder / "results"
    assert (
        main(
            [f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}", f"data.root={image_folder}", f"output={inside}"]
        )
        == 2
    )
    assert "inside data.root" in capsys.readouterr().err
    assert not inside.exists()


def test_an_unknown_split_is_one_line_naming_the_choices(tmp_path, trained_run):
    result = run_module_in_process(
        tmp_path, "finetune.evaluate", f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}", "split=testing"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown split 'testing': choose split=train or split=val or split=test"
    assert list(tmp_path.iterdir()) == []


def test_a_reset_collection_scores_the_next_epoch_as_a_fresh_one_would():
    # Every epoch resets the collection; the per-class metrics share their compute group's state (the warning
    # torchmetrics gives about their update count is silenced in finetune.model.metrics).
    generator = torch.Generator().manual_seed(0)
    epochs = [
        (torch.randn(n, 3, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in (50, 40)
    ]
    reused = classification_metrics(3, ["a", "b", "c"], prefix="val/")
    for logits, labels in epochs:
        reused.update(logits, labels)
        scores = reused.compute()
        reused.reset()
    fresh = classification_metrics(3, ["a", "b", "c"], prefix="val/")
    fresh.update(*epochs[-1])
    expected = fresh.compute()
    assert scores.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(scores[key], expected[key]), key
