"""Loggers by config: TensorBoard (default), CSV and MLflow, several at once; each gets the hyperparameters and the
best checkpoint's metrics, and the figures where it takes images."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_cli

TINY = (
    "model=mobilenet_v2",
    "model.weights=null",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.max_epochs=2",
)


@pytest.mark.slow
def test_csv_and_mlflow_loggers_together(tmp_path, image_folder, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked to
    run_cli(tmp_path, *TINY, f"data.root={image_folder}", "unfreeze=1", "logger=[csv,mlflow]")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert not (run / "tensorboard").exists()  # only the loggers chosen

    # CSV: one row of validation metrics per epoch; the hyperparameters in hparams.yaml.
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert len([row for row in rows if row["val/acc"]]) == 2
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert (hparams["strategy"], hparams["unfreeze"], hparams["seed"]) == ("finetune", "1", 42)
    assert hparams["trainable_params"] == metrics["params/trainable"]

    # MLflow: a file store in the run dir, with parameters, curves, the best checkpoint's metrics and figures.
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "finetune"]
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.data.params["strategy"] == "finetune" and logged.data.params["unfreeze"] == "1"
    assert len(client.get_metric_history(logged.info.run_id, "val/acc")) == 2
    assert logged.data.metrics["best/val/acc"] == pytest.approx(metrics["val/acc"])
    assert logged.data.metrics["best/test/acc"] == pytest.approx(metrics["test/acc"])
    figures = {artifact.path for artifact in client.list_artifacts(logged.info.run_id, "figures/val")}
    assert figures == {"figures/val/confusion_matrix"}
    assert len(client.list_artifacts(logged.info.run_id, "figures/val/confusion_matrix")) == 2  # one per epoch
    assert logged.info.status == "FINISHED"


@pytest.mark.slow
def test_an_unknown_logger_names_the_choices(tmp_path, image_folder):
    result = run_cli(tmp_path, *TINY, f"data.root={image_folder}", "logger=wandb", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "logger" in result.stderr and "tensorboard" in result.stderr
