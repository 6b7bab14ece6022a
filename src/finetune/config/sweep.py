"""A sweep's folds agree with `data.folds` before its first run starts.

`experiment=depth_study` sweeps `data.fold: range(0,${data.folds})`, so `data.folds=K` alone runs folds 0..K-1.
A sweep that names its own folds can still contradict `data.folds` (`data.folds=3 data.fold=0,1,2,3`, or
`data.folds=null` with several folds): without this check it would train every run up to the first bad fold and
stop there, hours later.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

KEYS = ("data.fold", "data.folds")


class CheckFoldSweep(HydraCallback):
    """Stops a sweep (one line, exit code 2) whose `data.fold` values do not fit `data.folds`.

    Hydra turns exceptions raised in callbacks into warnings, so this one prints its error and exits.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if OmegaConf.select(config, "data.folds", default="absent") == "absent":
            return  # a data config without folds: nothing to contradict
        message = contradiction(swept_values(config))
        if message:
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2)


def swept_values(config: DictConfig) -> dict[str, list[Any]]:
    """The values each of `data.fold` and `data.folds` takes in the sweep: the sweeper's params, then the command
    line's overrides (which win, as in Hydra's BasicSweeper), else the composed value."""
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={params[key]}" for key in KEYS if key in params]  # resolves ${data.folds}
    arguments += [override for override in config.hydra.overrides.task if override.split("=")[0] in KEYS]
    values = {key: [OmegaConf.select(config, key)] for key in KEYS}
    parser = OverridesParser.create()
    for argument in arguments:
        key = argument.split("=")[0]
        try:
            (override,) = parser.parse_overrides([argument])
        except HydraException:
            # range(0,None): the depth study's fold sweep with data.folds=null
            values[key] = [argument.partition("=")[2]]
            continue
        if override.is_discrete_sweep():
            values[key] = list(override.sweep_iterator())
        elif not override.is_sweep_override():
            values[key] = [override.value()]
        # Another kind of sweep (interval, an Optuna search space) is the sweeper's to check.
    return values


def contradiction(values: dict[str, list[Any]]) -> str | None:
    """The one line that says how the swept folds contradict `data.folds`, or None when they agree."""
    folds_values, fold_values = values["data.folds"], values["data.fold"]
    shown = ",".join(str(fold) for fold in fold_values)
    for folds in folds_values:
        if folds is None:
            if any(fold != 0 for fold in fold_values):  # without folds, data.fold means nothing
                return (
                    f"data.fold={shown} is swept but data.folds=null (one fixed split, no folds): set data.folds=K "
                    "to run K folds, or use experiment=depth_study_seeds for seeds on one split"
                )
            continue
        bad = [fold for fold in fold_values if not isinstance(fold, int) or not 0 <= fold < folds]
        if isinstance(folds, int) and bad:
            return (
                f"data.fold={shown} is swept but data.folds={folds} has folds 0..{folds - 1}: leave data.fold out "
                f"(data.folds={folds} alone runs folds 0..{folds - 1}) or sweep data.fold=range(0,{folds})"
            )
    return None
