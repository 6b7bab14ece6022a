"""Fine-tune a pretrained image classifier on an image folder: `python train.py model=mobilenet_v2 unfreeze=2`.

Configuration lives in conf/ (see conf/train.yaml); `python train.py --help` lists the groups and options.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from finetune.errors import find_usage_error
from finetune.scaling import ddp_processes_run_this_job
from finetune.train import run

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with ddp_processes_run_this_job():
            metrics = run(cfg)
    except Exception as error:
        usage_error = find_usage_error(error)
        if usage_error is None:
            raise
        # A problem the user can fix: one line, exit code 2, no traceback.
        log.error("error: %s", usage_error)
        sys.exit(2)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
