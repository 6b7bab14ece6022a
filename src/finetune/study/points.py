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


def unfreeze_order(value: int | str | None) -> tuple:
    # Deeper to the right: 0, 1, 2, ..., then all; anything else after.
    if isinstance(value, int):
        return (0, value, "")
    return (1, 0, "") if value == "all" else (2, 0, str(value))


def point_label(model: str | None, strategy: str | None, unfreeze: int | str | None, other: str) -> str:
    label = f"{model}/{strategy}/unfreeze={unfreeze}"
    return f"{label} {other}" if other else label
