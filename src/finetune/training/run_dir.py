"""A run's directory: never overwritten by a new run, and left resumable when training is interrupted.

- `RefuseToOverwrite` (a Hydra callback, see conf/train.yaml) stops a run before Hydra writes anything into a
  directory that already holds an earlier run, unless that run is being resumed (`ckpt_path=last`).
- `SaveOnInterrupt` (a Lightning callback) saves `checkpoints/last.ckpt` on Ctrl-C or SIGTERM, mid-epoch
  included, and `resume_from` finds it again: `python train.py <same overrides> hydra.run.dir=<run> ckpt_path=last`
  continues where training stopped.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from finetune.errors import UsageError

log = logging.getLogger(__name__)

# What a run leaves in its directory that is worth keeping; any of them there means the directory holds a run.
# (A run that stopped at a configuration error leaves only .hydra/ and train.log: trying again may reuse it.)
RUN_OUTPUTS = ("metrics.json", "checkpoints", "tensorboard")


class RefuseToOverwrite(HydraCallback):
    """Stops a run, or a sweep, whose output directory already holds an earlier run's outputs.

    Hydra turns exceptions raised in callbacks into warnings, so this one prints its error and exits (code 2).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # Lightning's DDP launcher starts the other ranks with hydra.run.dir set to rank 0's directory.
        if os.environ.get("LOCAL_RANK", "0") != "0" or config.get("ckpt_path") == "last":
            return
        run_dir = Path(config.hydra.run.dir)
        found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if found:
            _stop(
                f"hydra.run.dir={run_dir} already holds a run ({', '.join(found)}); pass another hydra.run.dir, "
                "or add ckpt_path=last to resume that run"
            )

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # Job folders named by the time (hparams_search=optuna's, to continue a study there) cannot collide.
        if "${now:" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]):
            return
        if sweep_dir.is_dir() and any((entry / ".hydra").is_dir() for entry in sweep_dir.iterdir()):
            _stop(
                f"hydra.sweep.dir={sweep_dir} already holds a sweep's runs; pass another hydra.sweep.dir (the "
                "default, multirun/<date>/<time>, is new for every sweep)"
            )


def _stop(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM during training: saves a resumable checkpoint where training stands, then stops.

    Lightning alone acts on SIGTERM only at the end of an epoch, in a single process; this stops after the batch
    in progress, so a cluster's grace period (often 30 s) is enough.

    Args:
        dirpath: the run's checkpoint folder; the checkpoint is `last.ckpt` there, what `ckpt_path=last` resumes.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self.signal: str | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.signal = "Ctrl-C"
        elif isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        else:
            return
        if trainer.state.stage not in (RunningStage.TRAINING, RunningStage.VALIDATING) or trainer.sanity_checking:
            return  # nothing trained yet: there is nothing to keep
        self.saved = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved)


def resume_from(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from: a path, or "last" for this run directory's checkpoints/last.ckpt."""
    if ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        hint = (
            "pass hydra.run.dir=<the run to resume> with ckpt_path=last"
            if ckpt_path == "last"
            else "pass ckpt_path=<an existing .ckpt file> or ckpt_path=last"
        )
        raise UsageError(f"no checkpoint to resume at {path}: {hint}")
    check_loadable(path)
    log.info("resuming from %s", path)
    return str(path)


def check_loadable(path: Path) -> None:
    """Stops with one line if torch cannot, or will not, load the checkpoint at `path`.

    Loaded as the resumed fit loads it (`weights_only=True`: tensors and plain values only, so a file that
    carries code is refused rather than run), and memory-mapped, so this costs no copy of the weights.
    """
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
        if isinstance(error, pickle.UnpicklingError):
            reason = (
                "it holds more than tensors and plain values (a pickle that may run code), which "
                f"weights_only loading refuses: {reason}"
            )
        raise UsageError(
            f"cannot resume from {path}: {reason}; pass ckpt_path=<a checkpoint this project "
            "saved> (checkpoints/last.ckpt of the run) or ckpt_path=last"
        ) from error
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops", "optimizer_states"} <= checkpoint.keys():
        raise UsageError(
            f"cannot resume from {path}: it is not a training checkpoint (no training state in it); "
            "pass ckpt_path=<a checkpoint this project saved> (checkpoints/last.ckpt of the run) or "
            "ckpt_path=last"
        )
