"""Step ratio: how much of the machine's raw training step a whole `python train.py` fit delivers, and where the rest
of the time goes.

- Whole fit: `finetune.train(...)`, the same run as `python train.py` (scan, validation, data loading, checkpoints,
  loggers, the test of the best checkpoint), with one extra callback, `FitTimer`, that times the fit from inside:
  training steps, waiting for the next batch, validation, the sanity check, and the rest (epoch ends, checkpoint
  writes). Its figure is `time/train_images_per_second` from the run's metrics.json: training images over the fit's
  wall time.
- Raw step: at the end of the fit, the same callback runs forward + cross-entropy + backward + AdamW on the fit's own
  network, on a copy of one of its own training batches (same size and dtype, laid out as its steps lay it out),
  under the fit's own precision context, `--raw-steps` times after 2 warm-up steps; the weights are restored
  afterwards. What this machine can do at best with this network, batch and precision. Lightning calls `on_fit_end`
  inside `trainer.fit`, so the raw step's own seconds (about 12 steps) are taken off the fit's time: before that,
  they counted as "before the fit loop" and held the ratio down (0.58 in bench/RESULTS.md, 2026-12-06 04:49).
- Before the first step: the seconds from calling `finetune.train` to the first training batch (scan, split, model,
  the fit's set-up, the sanity check), and from the start of `trainer.fit` to it.

    python bench/step_ratio.py             # EfficientNet-Lite0, unfreeze=all, 400 ELPV images, 224 px, 3 epochs
    python bench/step_ratio.py --smoke     # a tiny generated folder, 32 px, 1 epoch: seconds (the suite runs it)
    python bench/step_ratio.py --override trainer.precision=bf16-mixed   # any train.py override on top

The last line is `step_ratio X`: the whole fit's training images/s over the raw step's images/s (issue 21's goal:
X >= 0.8 for Lite0 unfreeze=all on 400 ELPV images at 224 px).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import add_smoke_argument, machine, revision, smoke_images, subset, today
from torch.nn import functional as F

from finetune.data.demo import demo_root
from finetune.features.cache import classify_features

# The ELPV-400 subset of docs/depth-study.md: stratified, 275 functional and 125 defective cells.
ELPV_400 = {"functional": 275, "defective": 125}


class FitTimer(L.Callback):
    """Times a fit from inside (see the module docstring) and writes the figures to `path` as JSON.

    Args:
        path: the JSON file to write at the end of the fit.
        raw_steps: timed raw steps at the end of the fit (0: none).
    """

    def __init__(self, path: str, raw_steps: int = 10) -> None:
        self.path, self.raw_steps = Path(path), raw_steps
        self.seconds = {"training steps": 0.0, "waiting for a batch": 0.0, "validation": 0.0, "sanity check": 0.0}
        self.images = 0
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mark = self._fit_start = 0.0
        self.first_step_at: float | None = None  # time.perf_counter() as the first training batch arrives

    def _since_mark(self) -> float:
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        return elapsed

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._since_mark()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.seconds["sanity check"] += self._since_mark()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._since_mark()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seconds["waiting for a batch"] += self._since_mark()
        if self.first_step_at is None:
            self.first_step_at = self._mark
        if self.batch is None:
            images, labels = batch[0], batch[1]
            self.batch = (images.detach().clone(memory_format=torch.preserve_format), labels.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds["training steps"] += self._since_mark()
        self.images += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._since_mark()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.seconds["validation"] += self._since_mark()

    def on_fit_end(self, trainer, pl_module) -> None:
        fit_loop = time.perf_counter() - self._fit_start
        raw_started = time.perf_counter()
        raw_rate = self._raw_step(trainer, pl_module) if self.raw_steps else None
        record = {
            "fit_loop_seconds": fit_loop,
            "seconds": self.seconds,
            "images": self.images,
            "raw_images_per_second": raw_rate,
            # Inside trainer.fit, so inside the run's time/fit_seconds: the bench takes it off again.
            "raw_step_seconds": time.perf_counter() - raw_started,
            "first_step_at": self.first_step_at,
            "fit_loop_started_at": self._fit_start,
            "batch_shape": list(self.batch[0].shape) if self.batch is not None else None,
            # The layout the steps (and the raw step) lay batches out in, not the loader's batches' (always NCHW:
            # reading those, the bench once printed "NCHW" for channels-last fits).
            "channels_last": bool(getattr(pl_module, "uses_channels_last", False)),
            "precision": str(trainer.precision),
        }
        self.path.write_text(json.dumps(record, indent=2) + "\n")

    def _raw_step(self, trainer, pl_module) -> float:
        images, labels = (tensor.to(pl_module.device) for tensor in self.batch)
        if images.dim() != 4:
            raise SystemExit(f"the fit trained on {images.dim()}-D batches (cached features?): time an uncached run")
        return raw_step_rate(pl_module, images, labels, trainer.precision_plugin.forward_context, self.raw_steps)


def raw_step_rate(pl_module, inputs: torch.Tensor, labels: torch.Tensor, forward_context, steps: int) -> float:
    """Images/s of the raw training step: forward, cross-entropy, backward and AdamW over `pl_module`'s trainable
    parameters, on one batch, `steps` times after 2 warm-up steps; the weights are put back afterwards.

    Args:
        pl_module: the `ImageClassifier`, laid out as its fit lays it out (`uses_channels_last`).
        inputs: images; or cached features where `pl_module.features_cut` is set, run from the cut on as the fit's
            steps run them (bench/study_floor.py).
        labels: the batch's labels.
        forward_context: the precision's context (Lightning's `trainer.precision_plugin.forward_context`).
        steps: timed steps.
    """
    if getattr(pl_module, "uses_channels_last", False) and inputs.dim() == 4:  # as the training step lays it out
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    on_features = getattr(pl_module, "trains_on_features", False)
    saved = {name: value.clone() for name, value in pl_module.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in pl_module.parameters() if p.requires_grad], lr=1e-5)
    pl_module.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with forward_context():
            logits = classify_features(pl_module, inputs) if on_features else pl_module(inputs)
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    pl_module.load_state_dict(saved)
    return steps * len(labels) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_smoke_argument(parser)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--raw-steps", type=int, default=10, help="timed raw steps (after 2 warm-up steps)")
    parser.add_argument("--override", action="append", default=[], help="a train.py override (repeatable)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="step_ratio-"))
    try:
        if args.smoke:
            data = smoke_images(work / "data", per_class=12)
            overrides = ["data.image_size=32", "trainer.max_epochs=1", "data.num_workers=0", "data.batch_size=8"]
            raw_steps = 2
        else:
            data = subset(demo_root("elpv"), work / "data", ELPV_400)
            overrides = ["data.image_size=224", f"trainer.max_epochs={args.epochs}"]
            raw_steps = args.raw_steps
        overrides = [
            f"data.root={data}",
            "unfreeze=all",
            *overrides,
            f"hydra.run.dir={work / 'run'}",
            "+callbacks.fit_timer._target_=step_ratio.FitTimer",
            f"+callbacks.fit_timer.path={work / 'timing.json'}",
            f"+callbacks.fit_timer.raw_steps={raw_steps}",
            *args.override,
        ]
        import finetune

        started = time.perf_counter()
        metrics = finetune.train(overrides)
        wall = time.perf_counter() - started
        timing = json.loads((work / "timing.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # The fit as train.py runs it, without the raw step this bench timed inside it (`FitTimer.on_fit_end`).
    fit_seconds = metrics["time/fit_seconds"] - timing["raw_step_seconds"]
    fit_rate = timing["images"] / fit_seconds
    raw_rate = timing["raw_images_per_second"]
    print(f"step_ratio on {machine(torch.device('cpu'))}, finetune {revision()}, {today()}")
    print(f"overrides: {' '.join(o for o in overrides if not o.startswith(('+callbacks', 'hydra.', 'data.root')))}")
    print(
        f"batch {timing['batch_shape']}, channels_last {timing['channels_last']}, precision {timing['precision']}; "
        f"{timing['images']} training images in the fit; the whole run took {wall:.1f} s"
    )
    setup = fit_seconds - timing["fit_loop_seconds"]
    rows = {"before the fit loop (DataModule.setup: the image cache; the model's set-up)": setup, **timing["seconds"]}
    rows["rest of the fit loop (epoch ends, checkpoints, logging)"] = timing["fit_loop_seconds"] - sum(
        timing["seconds"].values()
    )
    rows["training at the raw step's speed"] = timing["images"] / raw_rate
    print(f"\n| where the fit's {fit_seconds:.1f} s go | seconds | share |\n|---|---|---|")
    for name, seconds in rows.items():
        if name == "training at the raw step's speed":
            print(f"| (for comparison) {name} | {seconds:.1f} | {seconds / fit_seconds:.0%} |")
        else:
            print(f"| {name} | {seconds:.1f} | {seconds / fit_seconds:.0%} |")
    first_step = timing["first_step_at"] - started
    in_fit = setup + timing["first_step_at"] - timing["fit_loop_started_at"]
    print(
        f"\nbefore the first training step: {first_step:.1f} s from calling finetune.train (scan, split, model, "
        f"set-up, sanity check), {in_fit:.1f} s of them in trainer.fit; the raw step's own "
        f"{timing['raw_step_seconds']:.1f} s (inside trainer.fit) left out of the fit"
    )
    print(f"raw step {raw_rate:.1f} images/s; whole fit {fit_rate:.1f} training images/s")
    print(f"step_ratio {fit_rate / raw_rate:.2f}")


if __name__ == "__main__":
    sys.exit(main())
