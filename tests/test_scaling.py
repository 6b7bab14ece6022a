"""Beyond one process: DDP on the CPU (gloo) against a single process, the samplers' shards, SyncBatchNorm with
frozen blocks, the SLURM launcher's job script, sweeps through submitit's local executor, and an Optuna study that
is continued."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    REPO,
    make_image_folder,
    offline_env,
    run_cli_in_process,
    run_module_in_process,
    run_multirun,
    run_multirun_in_process,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from finetune.data.samplers import EpochShuffler, ViewDataset, ViewSampler
from finetune.errors import UsageError
from finetune.model.module import ImageClassifier
from finetune.training.scaling import _config_flags, check_distributed

TINY = ("data.image_size=32", "data.batch_size=8", "data.num_workers=0")


# --- samplers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "processes"), [(36, 2), (37, 2), (10, 3), (2, 3)])
def test_epoch_shuffler_shards_one_order_across_processes(size, processes):
    one = EpochShuffler(size, seed=7, keyed=True)
    one.set_epoch(3)
    order = [index for index, _ in one]
    generator = torch.Generator().manual_seed(7 * 1_000_003 + 3)
    assert order == torch.randperm(size, generator=generator).tolist()  # one process: the order as before DDP

    shards = []
    for rank in range(processes):
        sampler = EpochShuffler(size, seed=7, keyed=True, num_replicas=processes, rank=rank)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == -(-size // processes)  # as many steps in every process
        assert {epoch for _, epoch in shards[-1]} == {3}
    # Interleaved, the shards are the single-process order (padded with its first images to a multiple of the
    # processes): step k of a DDP run sees the images of step k of one process with `processes` times the batch.
    interleaved = [index for step in zip(*shards, strict=True) for index, _ in step]
    assert interleaved[:size] == order and set(interleaved[size:]) <= set(order)
    assert len(interleaved) - size < processes


def test_view_sampler_shards_the_views_of_the_epoch():
    views = torch.zeros(2, 5, 1)
    dataset = ViewDataset(views, torch.zeros(5, dtype=torch.long))
    shards = [ViewSampler(dataset, seed=0, num_replicas=2, rank=rank) for rank in (0, 1)]
    for sampler in shards:
        sampler.set_epoch(1)
    served = [index for sampler in shards for index in sampler]
    assert len(served) == 6 and set(served) == set(range(5, 10))  # view 1, every image, one padded


# --- DDP on the CPU -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory) -> Path:
    """train/val/test folders: 36 training images (18 per process: whole steps of 6), 13 validation images
    (7 and 6: one process runs a batch more) and 9 test images."""
    root = tmp_path_factory.mktemp("uneven")
    make_image_folder(root / "train", per_class=12, seed=1)
    make_image_folder(root / "val", per_class=5, seed=2)
    make_image_folder(root / "test", per_class=3, seed=3)
    for name in ("circle", "square"):
        (root / "val" / name / f"{name}_004.png").unlink()
    return root


def state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_ddp_on_two_processes_trains_what_one_process_trains(tmp_path, uneven_folder):
    # ConvNeXt normalises with LayerNorm and has no dropout: nothing depends on how a batch is split, so 2
    # processes with batches of 6 compute what 1 process computes with batches of 12, up to float rounding
    # (the order of the gradient all-reduce). All three run on the feature cache (data.augment=false): transfer
    # from the head's input, finetune and gradual from the frozen prefix; gradual unfreezes 2 blocks at epoch 2,
    # after DDP wrapped the model.
    common = (
        "model=timm",
        "model.name=convnext_atto",
        "model.weights=null",
        f"data.root={uneven_folder}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.augment=false",
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "trainer.precision=32-true",  # trainer=ddp_cpu's; the single process's auto could time bf16 faster
        "strategy.lr=1e-2",
        "strategy.backbone_lr=1e-2",
        "strategy=transfer,finetune,gradual",
    )
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_multirun(tmp_path, ddp, *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=6")
    run_multirun(tmp_path, single, *common, "data.batch_size=12")

    for job, strategy in enumerate(("transfer", "finetune", "gradual")):
        ddp_run, single_run = ddp / str(job), single / str(job)
        ddp_metrics = json.loads((ddp_run / "metrics.json").read_text())
        single_metrics = json.loads((single_run / "metrics.json").read_text())
        assert ddp_metrics["processes"] == 2 and "processes" not in single_metrics
        # Tolerance: the same prediction for every image; losses and weights within 1e-3 (measured: losses equal
        # to 4 decimals; weights 1.5e-4 apart at most after 9 AdamW steps at lr 1e-2; without the re-wrap at
        # unfreeze, gradual's late blocks were 7.9e-3 apart).
        for key in ("val/acc", "test/acc", "val/f1", "test/f1"):
            assert ddp_metrics[key] == single_metrics[key], (strategy, key)
        for key in ("val/loss", "test/loss", "train/loss"):
            assert ddp_metrics[key] == pytest.approx(single_metrics[key], abs=1e-3), (strategy, key)
        ddp_weights, single_weights = state(ddp_run), state(single_run)
        for name, value in single_weights.items():
            if value.is_floating_point():
                assert torch.allclose(ddp_weights[name], value, atol=1e-3), (strategy, name)

        # Process 0 writes the files; process 1 trained (its own log) and wrote nothing.
        rank_1 = (ddp_run / "train_ddp_process_1.log").read_text()
        assert "optimizer adamw" in rank_1 and "final metrics" not in rank_1
        assert "final metrics" in (ddp_run / "train.log").read_text()
        # The best epoch's checkpoint, best.ckpt (a link to it) and last.ckpt; nothing written twice.
        best, epoch, last = sorted(path.name for path in (ddp_run / "checkpoints").iterdir())
        assert (best, last) == ("best.ckpt", "last.ckpt") and epoch.startswith("epoch")
        assert "feature cache on" in rank_1
        if strategy == "gradual":
            assert "DDP: wrapped the model again" in rank_1


@pytest.mark.slow
def test_processes_started_by_the_cluster_find_their_ranks(tmp_path, image_folder):
    # As on several nodes: torchrun (or SLURM's srun) starts every process, each a whole `python train.py`;
    # Lightning reads the ranks from the environment. They share the run folder given on the command line.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={port}",
        str(REPO / "train.py"),
        f"hydra.run.dir={run}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "model=mobilenet_v2",
        "model.weights=null",
        "unfreeze=2",
        f"data.root={image_folder}",
        *TINY,
    ]
    result = subprocess.run(command, cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2
    assert (run / "train.log").read_text().count("final metrics") == 1  # both log here; process 0 writes


def test_ddp_settings_that_cannot_work_stop_with_one_line(tmp_path, image_folder):
    result = run_cli_in_process(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        *TINY,
        "trainer=ddp_cpu",
        "trainer.sync_batchnorm=true",
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "trainer.sync_batchnorm=true needs GPUs" in output
    assert not (tmp_path / "run" / "train_ddp_process_1.log").exists()  # stopped before starting process 1


def test_every_process_needs_an_image_of_each_evaluation_split():
    # Evaluation shards are not padded, so a process without a validation image would have nothing to evaluate.
    trainer = SimpleNamespace(
        world_size=4,
        num_devices=4,
        strategy=SimpleNamespace(
            root_device=torch.device("cpu"), cluster_environment=SimpleNamespace(creates_processes_externally=True)
        ),
    )
    splits = {"train": list(range(30)), "val": list(range(3)), "test": []}
    with pytest.raises(UsageError, match="the val split has 3 image.*fewer than the 4 processes"):
        check_distributed(trainer, splits, sync_batchnorm=False)
    check_distributed(trainer, {**splits, "val": list(range(4))}, sync_batchnorm=False)  # no test split: fine


def test_sync_batchnorm_keeps_frozen_blocks_frozen():
    # What trainer.sync_batchnorm=true does to the model when DDP sets it up (Lightning's TorchSyncBatchNorm).
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    model = ImageClassifier("mobilenet_v2", ["a", "b"], weights=None, unfreeze=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    groups = [[id(p) for p in group["params"]] for group in model.parameter_groups()]
    model = TorchSyncBatchNorm().apply(model)
    model.train()
    batch_norms = {name: m for name, m in model.network.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}
    assert len(batch_norms) == 52
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert [[id(p) for p in group["params"]] for group in model.parameter_groups()] == groups
    training = {name for name, m in batch_norms.items() if m.training}
    assert training and all(name.startswith(("features.17.", "features.18.")) for name in training)
    assert not batch_norms["features.16.conv.3"].training  # frozen: pretrained statistics, nothing to sync


def test_ddp_processes_of_a_sweep_job_keep_the_config_flags():
    argv = ["-m", "--config-dir", "extra", "strategy=transfer,finetune", "-cn=mine", "seed=1,2"]
    assert _config_flags(argv) == ["--config-dir", "extra", "-cn=mine"]


# --- cluster sweeps -----------------------------------------------------------------------------------------------


def compose_launcher(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return instantiate(cfg.hydra.launcher).params


def test_slurm_launcher_asks_for_one_task_per_gpu(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = compose_launcher(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert (params["gpus_per_node"], params["tasks_per_node"], params["nodes"]) == (4, 4, 2)
    assert params["partition"] == "gpu" and params["timeout_min"] == 240
    assert compose_launcher("hydra/launcher=slurm")["gpus_per_node"] == 1  # the default trainer: one GPU a job

    # The job script submitit writes from these settings, as the launcher passes them (a stand-in srun on PATH:
    # submitit's SLURM executor refuses to start without one).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in shared else f"slurm_{key}": value for key, value in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in (
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--time=240",
    ):
        assert f"#SBATCH {line}\n" in script, line


@pytest.mark.slow
def test_sweep_through_submitits_local_launcher_and_its_report(tmp_path, image_folder):
    sweep = tmp_path / "sweep"
    run_multirun(
        tmp_path,
        sweep,
        "hydra/launcher=local",
        "strategy=transfer,finetune",
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        *TINY,
        "trainer.max_epochs=1",
    )
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["params/trainable"] > 0
    assert (sweep / ".submitit").is_dir()  # submitit's own records, beside the runs

    report = run_report(tmp_path, sweep)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (sweep / "report.md").read_text().count("| done ") == 2


@pytest.mark.slow
def test_optuna_search_continues_its_study_from_the_sweep_folder(tmp_path, image_folder):
    sweep = tmp_path / "study"
    search = (
        "hparams_search=optuna",
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        *TINY,
        "trainer.max_epochs=1",
    )
    # In this process (Hydra's basic launcher runs the trials here too): the sweeper's own behaviour is tested.
    run_multirun_in_process(tmp_path, sweep, *search, "hydra.sweeper.n_trials=2")
    assert trials(sweep / "optuna.db") == 2
    run_multirun_in_process(tmp_path, sweep, *search, "hydra.sweeper.n_trials=1")  # the same folder: the same study
    assert trials(sweep / "optuna.db") == 3

    runs = sorted(path for path in sweep.iterdir() if (path / ".hydra").is_dir())
    assert len(runs) == 3  # the second invocation's job 0 beside the first's, not over it
    values = sorted(json.loads((run / "metrics.json").read_text())["val/acc"] for run in runs)
    assert values == sorted(stored_values(sweep / "optuna.db"))  # what train.py returned: each run's val/acc
    overrides = [OmegaConf.load(run / ".hydra" / "overrides.yaml") for run in runs]
    assert all(any(o.startswith("strategy.lr=") for o in run) for run in overrides)
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == max(values)

    report = run_report(tmp_path, sweep)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (sweep / "report.md").read_text().count("| done ") == 3
    assert "strategy.lr=" in report.stdout  # the searched values, in the table's `other` column


def trials(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]


def stored_values(database: Path) -> list[float]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("SELECT value FROM trial_values")]


def run_report(tmp_path: Path, sweep: Path) -> subprocess.CompletedProcess:
    # In this process: the report command itself is tested through its command line in test_report.py.
    return run_module_in_process(tmp_path, "finetune.report", f"sweep_dir={sweep}", "plots=false")
