"""Loggers by config: TensorBoard (default), CSV, MLflow and W&B, several at once; each gets the hyperparameters and
the best checkpoint's metrics, and the figures where it takes images."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY as TINY_RUN
from conftest import run_cli, run_cli_in_process, run_multirun
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from finetune.errors import UsageError
from finetune.training import loggers

TINY = (*TINY_RUN, "trainer.max_epochs=2")


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


def test_an_unknown_logger_names_the_choices(tmp_path, image_folder):
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", "logger=neptune", check=False)
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


def wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb): after a 7-byte header, LevelDB's log format, 32 KiB blocks
    of chunks (checksum, length, type, data) where a record is one FULL chunk or FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too short for a chunk header: the block's padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            return
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_dir(tmp_path, image_folder, monkeypatch):
    pytest.importorskip("wandb")
    # Any attempt to reach W&B's servers would fail, and show in its logs.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_cli(tmp_path, *TINY, f"data.root={image_folder}", "unfreeze=1", "logger=wandb")
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    [offline] = (run / "wandb").glob("offline-run-*")  # offline by default, in the run dir
    history, config, summary = [], {}, {}
    for record in wandb_records(next(offline.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "summary":
            summary |= {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update
            }
    # The scalars TensorBoard gets: one val/acc per epoch, the train curves, the test scores.
    assert len([row for row in history if "val/acc" in row]) == 2
    assert {"train/loss", "val/loss", "val/f1", "test/acc", "test/f1_class/circle"} <= {
        key for row in history for key in row
    }
    # The hyperparameters, and the best checkpoint's metrics beside them.
    assert (config["strategy"], config["unfreeze"], config["seed"]) == ("finetune", "1", 42)
    assert config["trainable_params"] == metrics["params/trainable"]
    assert summary["best/val/acc"] == pytest.approx(metrics["val/acc"])
    assert summary["best/test/acc"] == pytest.approx(metrics["test/acc"])
    # The figures: a confusion matrix per validation epoch and the test's.
    images = offline / "files" / "media" / "images"
    assert len(list((images / "val").glob("confusion_matrix_*.png"))) == 2
    assert len(list((images / "test").glob("confusion_matrix_*.png"))) == 1
    assert "127.0.0.1:9" not in "".join(log.read_text() for log in run.rglob("debug*.log"))


def test_a_logger_without_its_package_says_which_extra_to_install(monkeypatch):
    find_spec = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    config = OmegaConf.create({"wandb": {"_target_": "finetune.training.loggers.WandbLogger"}})
    with pytest.raises(UsageError, match=r"logger=wandb needs the wandb package: pip install -e '\.\[wandb\]'"):
        loggers.instantiate_loggers(config)
