"""Which training-time augmentation a study was measured under, in the verdict's words.

A depth study trains without augmentation by default: every point learns from the same images. With it
(`experiment=depth_study data.augment=basic`), the points whose frozen part is cached train on K augmented views of
each training image (`strategy.cache_views`, cached once; epoch e trains on view e mod K), and the points that train
every block (unfreeze=all) on live augmentation, whose first K epochs are those same views (each view is seeded by
the image's path and the epoch: `finetune.data.transforms.image_key`). The regime each run was configured with comes
from its `.hydra/config.yaml` (`finetune.study.runs`), what it trained on from its `metrics.json`
(`data/cached_views`: the views served from the cache, 0 where it trained on images).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

_UNSET = object()


@dataclass(frozen=True)
class Regime:
    """A run's training-time augmentation, as configured.

    Attributes:
        preset: the per-image preset (`data.augment`: none, basic, randaugment, trivialaugment).
        mixing: MixUp and CutMix of whole batches ("mixup 0.2"), "" without.
        views: `strategy.cache_views`, the augmented views a cached run keeps of each image; None without
            augmentation, where it means nothing.
    """

    preset: str
    mixing: str = ""
    views: int | None = None

    @property
    def augmented(self) -> bool:
        return self.preset != "none" or bool(self.mixing)

    @property
    def augmentation(self) -> str:
        """The augmentation in words: "basic", "basic with mixup 0.2", "mixup 0.2"."""
        if self.preset == "none":
            return self.mixing
        return f"{self.preset} with {self.mixing}" if self.mixing else self.preset

    def __str__(self) -> str:
        if not self.augmented:
            return "no augmentation"
        return f"augmentation {self.augmentation}, strategy.cache_views={self.views}"


def run_regime(config: DictConfig) -> Regime | None:
    """The regime a run's composed configuration sets; None where it has no `data.augment` (not a train.py run)."""
    augment = OmegaConf.select(config, "data.augment", default=_UNSET, throw_on_resolution_failure=False)
    if augment is _UNSET:
        return None
    # As finetune.data.transforms.augment_preset reads it (not imported: it would import torch into the report).
    preset = str({True: "basic", False: "none", None: "none"}.get(augment, augment))
    mixing = ", ".join(
        f"{name} {alpha:g}"
        for name in ("mixup", "cutmix")
        if (alpha := OmegaConf.select(config, f"data.{name}", default=0, throw_on_resolution_failure=False))
    )
    if preset == "none" and not mixing:
        return Regime(preset)
    return Regime(preset, mixing, OmegaConf.select(config, "strategy.cache_views", throw_on_resolution_failure=False))


def regime_sentence(points) -> str:
    """What the verdict says of the regime its points (`PointStats`) were measured under: one sentence, or a
    caution where their runs were not trained under one regime; "" where no run's configuration says."""
    regimes = Counter(run.regime for stats in points for run in stats.point.done if run.regime is not None)
    if not regimes:
        return ""
    if len(regimes) > 1:
        listed = "; ".join(f"{regime} in {_runs(count)}" for regime, count in regimes.items())
        return (
            f" Caution: these runs were not trained under one augmentation regime ({listed}), so their differences "
            "are not the depth's alone."
        )
    regime = next(iter(regimes))
    if not regime.augmented:
        return " Measured without training-time augmentation."
    served = [(stats.name, {run.get("data/cached_views") for run in stats.point.done}) for stats in points]
    mixed = [name for name, views in served if len(views - {None}) > 1]
    if mixed:
        return (
            f" Caution: {_names(mixed)} trained on cached views in some runs and on live augmentation in others "
            "(a feature cache declined: see each run's train.log), so their folds were not trained alike."
        )
    if any(None in views for _, views in served):  # runs from before data/cached_views was recorded
        return f" Measured with training-time augmentation {regime.augmentation} (strategy.cache_views={regime.views})."
    cached = [name for name, views in served if views != {0}]
    live = [name for name, views in served if views == {0}]
    head = f" Measured with training-time augmentation {regime.augmentation}"
    if not cached:
        return f"{head}, live for every point (new views every epoch)."
    counts = sorted({int(view) for _, views in served for view in views if view})
    k = " or ".join(str(count) for count in counts)
    sentence = (
        f"{head}: {_names(cached)} trained on {k} augmented view{'s' if counts != [1] else ''} of each training "
        f"image, cached once (epoch e on view e mod {k})"
    )
    if live:
        sentence += f"; {_names(live)} on live augmentation, the same views in the first {k} epochs and new ones after"
    return sentence + "."


def _runs(count: int) -> str:
    return f"{count} run{'s' if count != 1 else ''}"


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
