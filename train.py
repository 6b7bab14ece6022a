"""Fine-tune a pretrained image classifier on an image folder: `python train.py model=mobilenet_v2 unfreeze=2`.

Configuration lives in conf/ (see conf/train.yaml); `python train.py --help` lists the groups and options.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from finetune.errors import UsageError
from finetune.train import run

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except UsageError as error:
        # A problem the user can fix: one line, exit code 2, no traceback.
        log.error("error: %s", error)
        sys.exit(2)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
