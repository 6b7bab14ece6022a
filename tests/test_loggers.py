"""Loggers by config: TensorBoard (default), CSV and MLflow, several at once; each gets the hyperparameters and the
best checkpoint's metrics, and the figures where it takes images."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import run_cli, run_multirun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

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


@pytest.mark.slow
def test_tensorboard_shows_each_run_once_with_what_the_sweep_varies_first(tmp_path, image_folder):
    # A two-depth sweep, read back by a real TensorBoard server's HPARAMS API (what its tab shows).
    sweep = tmp_path / "sweep"
    run_multirun(tmp_path, sweep, *TINY, f"data.root={image_folder}", "unfreeze=0,1", "trainer.max_epochs=1", "seed=3")
    for job in ("0", "1"):
        board = sweep / job / "tensorboard"
        assert not [p for p in board.iterdir() if p.is_dir()], "a second TensorBoard run beside the curves"
        events = EventAccumulator(str(board)).Reload()
        tags = events.PluginTagToContent("hparams")
        assert "_hparams_/experiment" not in tags  # TensorBoard builds it from the sessions, marking what differs
        session = HParamsPluginData.FromString(tags["_hparams_/session_start_info"]).session_start_info.hparams
        assert set(session) == {"unfreeze", "trainable_params"}  # constant keys (seed, data.root, ...) left out
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert [p.value for p in events.Scalars("best/val/acc")] == pytest.approx([metrics["val/acc"]])
        assert len(events.Scalars("val/acc")) == 1  # the curve keeps one point per epoch

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(sweep),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        experiment = _post_when_up(f"http://127.0.0.1:{port}/data/plugin/hparams/experiment", {"experimentName": ""})
        runs = _post_when_up(f"http://127.0.0.1:{port}/data/runs", None)
    finally:
        server.terminate()
        server.wait(timeout=30)
    infos = experiment["hparamInfos"]
    assert [info["name"] for info in infos] == ["trainable_params", "unfreeze"]
    assert all(info.get("differs") for info in infos)
    metrics_shown = [info["name"]["tag"] for info in experiment["metricInfos"]][:5]  # the five the tab ticks
    assert metrics_shown == ["best/test/acc", "best/test/f1", "best/val/acc", "best/val/f1", "best/val/loss"]
    assert sorted(runs) == ["0/tensorboard", "1/tensorboard"]  # each run once


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post_when_up(url: str, body: dict | None, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
