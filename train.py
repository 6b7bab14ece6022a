"""Fine-tune a pretrained image classifier on an image folder: `python train.py model=mobilenet_v2 unfreeze=2`.

Configuration lives in conf/ (see conf/train.yaml); `python train.py --help` lists the groups and options.
Errors the user can fix (a bad override, a missing folder, unreadable data) print one line and exit with code 2
(`finetune.apps`); `HYDRA_FULL_ERROR=1 python train.py ...` shows the full traceback instead.
"""

import sys

from omegaconf import DictConfig

from finetune import apps
from finetune.features.store import SharedFeatures
from finetune.training.run import run
from finetune.training.scaling import ddp_processes_run_this_job

# This process's runs (a multirun's jobs: a depth study's folds and seeds) run the frozen part once between them.
FEATURES = SharedFeatures()


@apps.command("train", config_path="conf")
def main(cfg: DictConfig) -> float | None:
    with ddp_processes_run_this_job():
        metrics = run(cfg, FEATURES)
    return metrics.get(cfg.optimized_metric)  # what a sweeper (hparams_search=optuna) optimizes


if __name__ == "__main__":
    sys.exit(main())
