"""A point of a depth study: a depth (`unfreeze`), and the strategy where it is more than a depth (LP-FT).

`transfer`, `finetune` and `full` differ only in the depth they set, so their points are named by the depth alone;
any other strategy (`lp_ft`, `gradual`) trains a depth differently and is named with it. The same rule names a
study's run folders (`hydra.sweep.subdir`: `unfreeze-2_fold-3`, `lp_ft-unfreeze-2_fold-3`), the points in the
report and the setting the verdict recommends.
"""

from __future__ import annotations

# Strategies that are nothing but a depth (conf/strategy/): their points are named by `unfreeze` alone.
DEPTH_ONLY = (None, "transfer", "finetune", "full")
TITLES = {"lp_ft": "LP-FT", "gradual": "gradual unfreezing"}


def is_depth_only(strategy: str | None) -> bool:
    return strategy in DEPTH_ONLY


def point_name(unfreeze, strategy: str | None = None) -> str:
    """In words, for the verdict and the tables: "transfer learning (unfreeze=0)", "unfreeze=2", "LP-FT unfreeze=2"."""
    if not is_depth_only(strategy):
        return f"{TITLES.get(strategy, strategy)} unfreeze={unfreeze}"
    if unfreeze == 0:
        return "transfer learning (unfreeze=0)"
    return f"unfreeze={unfreeze}"


def point_setting(unfreeze, strategy: str | None = None) -> str:
    """The command-line setting that trains the point: "unfreeze=2", "strategy=lp_ft unfreeze=2"."""
    return f"unfreeze={unfreeze}" if is_depth_only(strategy) else f"strategy={strategy} unfreeze={unfreeze}"


def run_folder(strategy: str, unfreeze) -> str:
    """The `${study_run:...}` resolver of conf/experiment/depth_study*.yaml: "unfreeze-2", "lp_ft-unfreeze-2"."""
    return f"unfreeze-{unfreeze}" if is_depth_only(strategy) else f"{strategy}-unfreeze-{unfreeze}"
