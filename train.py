"""Fine-tune a pretrained image classifier on an image folder: `python train.py model=mobilenet_v2 unfreeze=2`.

Configuration lives in conf/ (see conf/train.yaml); `python train.py --help` lists the groups and options.
Errors the user can fix (a bad override, a missing folder, unreadable data) print one line and exit with code 2;
`HYDRA_FULL_ERROR=1 python train.py ...` shows the full traceback instead.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from finetune.errors import config_error_message, find_usage_error
from finetune.scaling import ddp_processes_run_this_job
from finetune.training import run

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with ddp_processes_run_this_job():
            metrics = run(cfg)
    except Exception as error:
        usage_error = find_usage_error(error)
        if usage_error is None or _verbose():
            raise
        # A problem the user can fix: one line (in the run's log too), exit code 2, no traceback.
        log.error("error: %s", usage_error)
        sys.exit(2)
    return metrics.get(cfg.optimized_metric)


def _verbose() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get("FINETUNE_SET_HYDRA_FULL_ERROR")


def cli() -> int:
    """Runs `main`, turning configuration errors (raised before the run starts) into one line and exit code 2."""
    verbose = _verbose()
    # Hydra then hands its errors (unknown keys, options, bad overrides) to us instead of printing them itself.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ["FINETUNE_SET_HYDRA_FULL_ERROR"] = "" if verbose else "1"
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        usage_error = find_usage_error(error)
        message = str(usage_error) if usage_error is not None else config_error_message(error)
        if message is None or verbose:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
