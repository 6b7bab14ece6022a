"""Beyond one process: checks for DDP runs, DDP inside a Hydra sweep, and the sweep folder of an Optuna study.

The engines are Lightning's (DDPStrategy, its launchers and cluster environments) and Hydra's (sweepers,
launchers); this module only covers what they leave to the application.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from finetune.errors import UsageError

# Hydra's flags that choose the configuration (with a value); the other processes of a job need them too.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def check_distributed(trainer: L.Trainer, splits: dict[str, list], sync_batchnorm: bool) -> None:
    """Stops a multi-process run that could not work, before Lightning starts the other processes.

    Args:
        trainer: the run's Trainer (its world size is known from the environment as soon as it exists).
        splits: the data module's split lists (`train`, `val`, `test`).
        sync_batchnorm: the Trainer's `sync_batchnorm` setting.

    Raises:
        UsageError: SyncBatchNorm on the CPU, a DDP job inside a submitit-local job, or a validation or test
            split with fewer images than processes.
    """
    processes = trainer.world_size
    if processes == 1:
        return
    if sync_batchnorm and trainer.strategy.root_device.type == "cpu":
        raise UsageError(
            "trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on the CPU; "
            "drop it for trainer=ddp_cpu"
        )
    started_by_cluster = trainer.strategy.cluster_environment.creates_processes_externally
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and not started_by_cluster:
        raise UsageError(
            f"trainer.devices={trainer.num_devices} under hydra/launcher=local: Lightning cannot start "
            "the other processes of a job from inside a submitit job; sweep DDP jobs with the default "
            "launcher (one job after the other) or hydra/launcher=slurm (one task per GPU)"
        )
    # Evaluation shards are not padded with repeated images, so every process needs at least one image of each.
    for split in ("val", "test"):
        count = len(splits[split])
        if 0 < count < processes:
            raise UsageError(
                f"the {split} split has {count} image(s), fewer than the {processes} processes of "
                "this run: each evaluates its own share; add images or lower trainer.devices"
            )


@contextmanager
def ddp_processes_run_this_job() -> Iterator[None]:
    """Lets Lightning's DDP launcher start the other processes of a job of a Hydra sweep (`-m`).

    The launcher starts them with this process's command line plus `hydra.run.dir=<run.dir>`: in a sweep that
    command line is the whole sweep (`-m`, every value) and `run.dir` is not the job's folder. For the duration
    of the job, the command line becomes the job's own overrides and `run.dir` its folder; afterwards the
    environment the launcher left (`LOCAL_RANK`, `MASTER_PORT`, ...) and the process group go, so the next job
    of the sweep starts its own processes. Outside a sweep, or where the cluster starts every process (SLURM,
    torchrun), nothing changes.
    """
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.mode != RunMode.MULTIRUN or "LOCAL_RANK" in os.environ:
        yield
        return
    argv, environment = sys.argv, dict(os.environ)
    sys.argv = [argv[0], *_config_flags(argv[1:]), *hydra.overrides.task]
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environment)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _config_flags(arguments: list[str]) -> list[str]:
    kept, pending = [], False
    for argument in arguments:
        if pending:
            kept.append(argument)
            pending = False
        elif argument in _CONFIG_FLAGS:
            kept.append(argument)
            pending = True
        elif argument.startswith(tuple(f"{flag}=" for flag in _CONFIG_FLAGS)):
            kept.append(argument)
    return kept


class MakeSweepDir(Callback):
    """Creates the sweep folder when a sweep starts, before the sweeper opens its Optuna storage inside it
    (Hydra's launchers create it only when they launch the first jobs)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
