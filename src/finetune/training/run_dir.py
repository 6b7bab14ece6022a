"""A run's directory: never overwritten by a new run, and left resumable when training is interrupted.

- `RefuseToOverwrite` (a Hydra callback, see conf/train.yaml) stops a run before Hydra writes anything into a
  directory that already holds an earlier run, unless that run is being resumed (`ckpt_path=last`).
- `SaveOnInterrupt` (a Lightning callback) saves `checkpoints/last.ckpt` on Ctrl-C or SIGTERM, mid-epoch
  included, and `resume_from` finds it again: `python train.py <same overrides> hydra.run.dir=<run> ckpt_path=last`
  continues where training stopped.
- `BestCheckpoint` (Lightning's ModelCheckpoint) keeps `checkpoints/best.ckpt`: the best epoch's checkpoint, the one
  metrics.json scores, under a name predict, evaluate and export examples can use.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import ModelCheckpoint
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


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also keeps `best.ckpt` beside its best file (e.g. `epoch07-0.8712.ckpt`): a hard link,
    or a copy where the file system has none. The epoch's own file keeps its telling name; `best.ckpt` is the name
    nobody has to guess. `ckpt_path=last` resumes from `last.ckpt` as before.

    Args:
        best_name: the file name of the stable copy, in `dirpath`.
        **kwargs: ModelCheckpoint's (monitor, mode, save_top_k=1, ...).
    """

    def __init__(self, best_name: str = "best.ckpt", **kwargs) -> None:
        super().__init__(**kwargs)
        self.best_name = best_name

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # With a monitor, this callback saves only new bests (and removes the previous one).
        if trainer.is_global_zero and self.monitor is not None:
            link_or_copy(Path(filepath), Path(filepath).with_name(self.best_name))


def link_or_copy(source: Path, target: Path) -> None:
    """Makes `target` the same file as `source` (a hard link, else a copy), replacing it in one step: a reader never
    sees a half-written `target`."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:  # no hard links here (some network and FAT file systems)
        shutil.copyfile(source, partial)
    os.replace(partial, target)


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
