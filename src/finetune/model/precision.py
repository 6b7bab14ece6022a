"""`trainer.precision=auto`: bf16 mixed precision where the CPU has bf16 instructions and a measured step is faster
for it; fp32 elsewhere. The same rule decides the feature pass (the frozen part, forward only, once over the data).

Measured, not assumed: on this project's 2-core CPU with avx512_bf16 (issue 21; batch 32, 224 px, channels-last),
bf16 autocast made MobileNetV2's full fine-tuning step 1.34x faster and EfficientNet-Lite0's forward pass 1.47x, but
Lite0's full fine-tuning step not at all (1.0x). So `auto` times this run's own work: a warm-up, then at least three
pairs of steps (fp32, bf16) back to back, on random inputs shaped as its batches, and takes bf16 where the median
ratio is at least `PAYS`. A measurement is kept for the process under what decides it (architecture, what trains,
cut, image size, batch, memory layout): the folds and seeds of a depth study measure once per depth. Where the run
trains on cached features the step timed is that of the trainable part on features of the cached shape: it is
small, and so is its measurement, and it decides for shallow depths too, whose blocks still do real work (the head
alone, microseconds, is timed over repeated calls). Timings too unsteady to decide on (pairs whose ratios spread
over `UNSTEADY`: another process was using the CPU) keep fp32, and the log says so. A resumed run keeps the
precision its checkpoint holds.

`auto` stays fp32, unmeasured, where the run is not on the CPU (on CUDA as before: trainer=gpu asks for bf16-mixed),
where several processes train (each would measure on its own, and could choose differently), and on a CPU without
AMX or avx512_bf16 (bf16 there is emulated, slower than fp32). Any other `trainer.precision` is used as given.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from finetune.features.cache import classify_features, should_cache
from finetune.features.cut import Cut
from finetune.features.partial_forward import forward_to, modes, restore_modes
from finetune.model.freezing import set_depth
from finetune.training.callbacks import wants_channels_last

AUTO = "auto"
# bf16 is taken where it is at least this much faster: a smaller gain is within the probe's noise on a busy machine,
# and not worth bf16's rounding.
PAYS = 1.15
# Timed pairs (one fp32 and one bf16 timing, back to back) after the warm-up: at least MIN_PAIRS, more while the
# measurement has taken under MORE_PAIRS_S (small steps), at most MAX_PAIRS. The median of the pairs' ratios counts:
# a busy machine slows a whole pair alike, and the odd pair that one side lost to another process is outvoted.
MIN_PAIRS, MAX_PAIRS, MORE_PAIRS_S = 3, 9, 1.0
MIN_TIMING_S = 0.1  # a step of microseconds (the head on cached features) is repeated for at least this long
# Pairs whose ratios spread wider than this (upper over lower quartile) measured another process's use of the CPU,
# not bf16: `auto` then stays fp32 and says so. An idle machine's pairs agree within a few percent.
UNSTEADY = 1.3

# bf16's speed over fp32's and the spread of its timings, by what decides them, for the runs of this process.
_measured: dict[tuple, tuple[float, float]] = {}


@dataclass(frozen=True)
class Choice:
    """A precision and why.

    Attributes:
        precision: what Lightning's Trainer takes: `bf16-mixed` or `32-true` from `auto`, else the setting as given.
        reason: why, for the log.
        speedup: bf16's measured speed over fp32's (the median of the timed pairs); None where nothing was measured.
        spread: how far the pairs' ratios spread (upper over lower quartile; 1: they agree); None, unmeasured.
    """

    precision: str | int | None
    reason: str
    speedup: float | None = None
    spread: float | None = None

    @property
    def bf16(self) -> bool:
        return "bf16" in str(self.precision)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the feature pass keeps its features in: bfloat16 under a bf16 precision, else float32."""
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def line(self) -> str:
        """`bf16-mixed (the CPU has avx512_bf16; a training step 1.34x faster than fp32)`."""
        return f"{self.precision} ({self.reason})"

    def facts(self, prefix: str = "precision/") -> dict[str, float]:
        """What metrics.json records: `<prefix>bf16` (1: bf16, 0: not) and, where measured, `<prefix>bf16_speedup` and
        `<prefix>bf16_spread`."""
        facts = {f"{prefix}bf16": float(self.bf16)}
        if self.speedup is not None:
            facts |= {f"{prefix}bf16_speedup": self.speedup, f"{prefix}bf16_spread": self.spread}
        return facts


def cpu_bf16() -> str | None:
    """The bf16 instructions this CPU has that torch's kernels (oneDNN) use: "AMX", "avx512_bf16", or None."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def choose_precision(
    trainer_config, build_model: Callable[[], nn.Module], datamodule, resume: str | None = None
) -> Choice:
    """The run's training precision: `trainer.precision` as set; for `auto`, bf16-mixed where the CPU has bf16 and a
    training step of this run's model (what trains, at its batch, image size and memory layout; on cached features
    where it trains on them) is at least `PAYS` times faster in bf16, else 32-true.

    Args:
        trainer_config: the run's `trainer` section.
        build_model: makes the run's model; one is built for the measurement and dropped.
        datamodule: the run's DataModule, prepared: its batch size, and whether it will serve cached features.
        resume: the checkpoint the run resumes from: `auto` goes on in the precision it holds (a new measurement
            could choose the other, and the resumed run would not end as an uninterrupted one).
    """
    setting = trainer_config.get("precision")
    if setting != AUTO:
        return Choice(setting, "trainer.precision as set: nothing measured")
    if resume is not None:
        started_in = torch.load(resume, map_location="cpu", weights_only=True, mmap=True).get("precision")
        if started_in is not None:
            return Choice(started_in, "auto: as the run being resumed chose")
    why_fp32 = _fp32_unmeasured(_device_type(trainer_config.get("accelerator")), _processes(trainer_config))
    if why_fp32:
        return Choice("32-true", why_fp32)
    model = build_model()
    set_depth(model, model.schedule.max_depth)  # a gradual schedule's deepest: its costliest step
    cut = should_cache(datamodule.cache_features, model, datamodule, datamodule.cache_views)[0]
    channels_last = wants_channels_last(model, torch.device("cpu"), on_features=cut is not None)
    size, batch = model.preprocessing.crop_size, datamodule.batch_size
    hp = model.hparams
    key = ("step", hp.source, hp.name, hp.head_hidden_dim, hp.train_bn, model.depth, cut, size, batch, channels_last)
    measured = _measure(key, lambda: _training_step(model, cut, batch, size, channels_last))
    return _by_measurement(measured, "a training step on cached features" if cut else "a training step")


def feature_pass_precision(
    setting, model, cut: Cut, batch_size: int, device: torch.device, processes: int = 1
) -> Choice:
    """The feature pass's precision (the network up to `cut`, forward only, once over the data): bf16 autocast, the
    features kept in bf16 (half the memory), under a bf16 `setting`; for `auto`, where the CPU has bf16 and the pass
    is at least `PAYS` times faster in bf16 (timed on random images at the run's batch and size); else fp32.

    Args:
        setting: `auto` or a Lightning precision (train.py: trainer.precision, as set).
        model: the `ImageClassifier`; its network is laid out as the feature pass runs it (channels-last or not).
        cut: where the cached features are taken.
        batch_size: images a batch of the pass.
        device: where the pass runs.
        processes: processes that train (under DDP each runs the pass itself).
    """
    if setting != AUTO:
        precision = "bf16-mixed" if "bf16" in str(setting) else "32-true"
        return Choice(precision, f"as trainer.precision={setting}")
    why_fp32 = _fp32_unmeasured(device.type, processes)
    if why_fp32:
        return Choice("32-true", why_fp32)
    layout = torch.channels_last if wants_channels_last(model, device, on_features=True) else torch.contiguous_format
    size, hp = model.preprocessing.crop_size, model.hparams
    key = ("forward", hp.source, hp.name, cut.module, size, batch_size, layout)
    network = model.network.to(device=device, memory_format=layout)  # as build_cache lays it out
    with _eval_mode(network):
        measured = _measure(key, lambda: _forward_pass(network, cut.module, batch_size, size, layout))
    return _by_measurement(measured, "the frozen part's forward pass")


def _device_type(accelerator) -> str:
    """Where a Trainer with this `accelerator` trains: cpu, cuda, mps, or the accelerator's name."""
    accelerator = str(accelerator or "auto")
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" and torch.cuda.is_available() else accelerator


def _processes(trainer_config) -> int:
    """Processes a CPU Trainer starts: devices x nodes (devices=auto: one on the CPU)."""
    devices = trainer_config.get("devices", 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        count = len(devices)
    else:
        count = int(devices) if str(devices).isdigit() else 1
    return count * int(trainer_config.get("num_nodes", 1) or 1)


def _fp32_unmeasured(device: str, processes: int) -> str | None:
    """Why `auto` stays fp32 without measuring anything, or None where it measures."""
    if device != "cpu":
        return f"auto on {device}: fp32 as before; trainer.precision=bf16-mixed (as trainer=gpu sets) for bf16"
    if processes > 1:
        return (
            f"auto with {processes} processes: each would measure on its own and could choose differently; "
            "trainer.precision=bf16-mixed for bf16"
        )
    if cpu_bf16() is None:
        return "auto: the CPU has neither AMX nor avx512_bf16, so bf16 would be emulated"
    return None


def _by_measurement(measured: tuple[float, float], what: str) -> Choice:
    speedup, spread = measured
    feature = cpu_bf16()
    if spread > UNSTEADY:
        return Choice(
            "32-true",
            f"the CPU has {feature}, but {what} in bf16 measured {speedup:.2f}x fp32's speed in timings too unsteady "
            f"to decide on (pairs {spread:.2f}x apart: another process is using the CPU); trainer.precision="
            "bf16-mixed for bf16",
            speedup,
            spread,
        )
    if speedup >= PAYS:
        return Choice("bf16-mixed", f"the CPU has {feature}; {what} {speedup:.2f}x faster than fp32", speedup, spread)
    return Choice(
        "32-true",
        f"the CPU has {feature}, but {what} in bf16 measured {speedup:.2f}x fp32's speed: under the {PAYS}x that pays",
        speedup,
        spread,
    )


def _measure(key: tuple, make_step: Callable[[], Callable[[bool], None]]) -> tuple[float, float]:
    """bf16's speed over fp32's for the step `make_step` makes (a function of `bf16`), and the spread of the timed
    pairs' ratios, measured once per `key` in this process. The global random state is left as it was (dropout
    draws from it)."""
    if key not in _measured:
        with torch.random.fork_rng(devices=[]):
            step = make_step()
            for bf16 in (False, True):  # warm-up: oneDNN builds its kernels on a shape's first call
                _seconds(step, bf16)
            ratios: list[float] = []
            started = time.perf_counter()
            while len(ratios) < MIN_PAIRS or (len(ratios) < MAX_PAIRS and time.perf_counter() - started < MORE_PAIRS_S):
                order = (False, True) if len(ratios) % 2 == 0 else (True, False)  # neither side always goes first
                seconds = {bf16: _seconds(step, bf16) for bf16 in order}
                ratios.append(seconds[False] / seconds[True])
        lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive")
        _measured[key] = (statistics.median(ratios), upper / lower)
    return _measured[key]


def _seconds(step: Callable[[bool], None], bf16: bool) -> float:
    """Seconds per call of `step(bf16)`, called until `MIN_TIMING_S` has passed (at least once)."""
    calls, started = 0, time.perf_counter()
    while True:
        step(bf16)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= MIN_TIMING_S:
            return elapsed / calls


def _training_step(model, cut: Cut | None, batch: int, size: int, channels_last: bool) -> Callable[[bool], None]:
    """Forward (under bf16 autocast or not, as Lightning's bf16-mixed runs a training step) + loss + backward of
    what trains in `model`, on random inputs shaped as the run's batches: images, or the features at `cut`."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, *(cut.shape if cut else (3, size, size)), generator=generator)
    labels = torch.randint(0, len(model.class_names), (batch,), generator=generator)
    if channels_last:
        model.network.to(memory_format=torch.channels_last)
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
    model.features_cut = cut
    model.train()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):  # as Lightning's
            logits = classify_features(model, inputs) if cut else model(inputs)
            loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)  # each backward writes fresh gradients, as after an optimizer step

    return step


def _forward_pass(network: nn.Module, module: str, batch: int, size: int, layout) -> Callable[[bool], None]:
    """The network's forward pass up to `module`, without gradients, on a batch of random images."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    images = images.to(next(network.parameters()).device).contiguous(memory_format=layout)

    def step(bf16: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward_to(network, module, images)

    return step


@contextmanager
def _eval_mode(network: nn.Module):
    """The network in eval mode, as the feature pass runs it; every module's mode put back afterwards."""
    saved = modes(network)
    network.eval()
    try:
        yield
    finally:
        restore_modes(saved)
