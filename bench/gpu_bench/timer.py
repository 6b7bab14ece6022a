"""What bench/gpu.py adds inside each training run: a step timer (a callback) and a host-side profiler.

train.py instantiates them from `+callbacks.gpu_timer._target_=gpu_bench.timer.StepTimer` and
`+trainer.profiler._target_=gpu_bench.timer.HostProfiler` (bench/ is on the runs' PYTHONPATH), so the run is
otherwise untouched.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.profilers import Profiler


class HostProfiler(Profiler):
    """Lightning's profiler hook points, timed for three actions only (host clocks): the training loader's `next`
    (the host waiting for a batch), the batch's transfer to the device (with on_after_batch_transfer: device-side
    augmentation is launched there), and ModelCheckpoint's hooks (saving checkpoints). Everything else passes
    through at the cost of a substring test. Added with `+trainer.profiler._target_=gpu_bench.timer.HostProfiler`."""

    ACTIONS = {"train_dataloader_next": "fetch", "batch_to_device": "transfer", "ModelCheckpoint": "checkpoint"}

    def __init__(self) -> None:
        super().__init__()
        self.phase = "train"  # StepTimer switches it to "val" during validation
        self.totals: dict[str, float] = {}
        self._open: dict[str, tuple[str, float]] = {}

    def start(self, action_name: str) -> None:
        for key, category in self.ACTIONS.items():
            if key in action_name:
                self._open[action_name] = (category, time.perf_counter())
                return

    def stop(self, action_name: str) -> None:
        opened = self._open.pop(action_name, None)
        if opened is not None:
            name = f"{self.phase}/{opened[0]}"
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - opened[1]


class StepTimer(L.Callback):
    """Times every training step's data wait and compute, validation and the rest of the fit; writes JSON at fit end.

    On CUDA the step boundaries are CUDA events recorded on the current stream (no synchronisation inside an
    epoch, so the timing does not change what it measures); on the CPU, host clocks.

    Args:
        path: the JSON file written at the end of the fit.
        train_metrics: False: training steps skip the module's torchmetrics updates (a bench experiment).
        sync_check: count GPU->host synchronisations over one cycle of the second epoch (CUDA only): from the end
            of its step 1 to the end of its step 2 (the loop between steps, the fetch, the copy, step 2).
    """

    def __init__(self, path: str, train_metrics: bool = True, sync_check: bool = True) -> None:
        self.path = Path(path)
        self.train_metrics = train_metrics
        self.sync_check = sync_check
        self.notes: list[str] = []
        self.epochs: list[dict] = []
        self.validation_s: list[float] = []
        self.sanity_s = 0.0
        self.syncs: dict | None = None
        self._catching = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def on_fit_start(self, trainer, module) -> None:
        self.cuda = module.device.type == "cuda"
        self.fit_start_wall = time.time()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if not self.train_metrics:
            self._skip_train_metrics(module)
        self.profiler = trainer.profiler if isinstance(trainer.profiler, HostProfiler) else None
        self.fit_start = self._now()

    def _skip_train_metrics(self, module) -> None:
        metrics, loss = getattr(module, "train_metrics", None), getattr(module, "train_loss", None)
        if metrics is None or loss is None:
            self.notes.append("nometrics: module has no train_metrics/train_loss, nothing skipped")
            return
        metrics.update = lambda *args, **kwargs: None

        def mean_update(value, weight=1.0):  # MeanMetric's sums, without its NaN check and scalar copy (2 syncs)
            value = value.detach().float()
            loss.mean_value += value.sum() * float(weight)
            loss.weight += value.numel() * float(weight)
            loss._update_count += 1  # what Metric's update wrapper counts (_log_epoch reads update_count)

        loss.update = mean_update

    def on_train_epoch_start(self, trainer, module) -> None:
        self._epoch = {
            "epoch": trainer.current_epoch,
            "start": self._mark(),
            "marks": [],
            "host_wait": 0.0,
            "host_step": 0.0,
            "images": 0,
        }
        self._host_ready = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        host = time.perf_counter()
        epoch = self._epoch
        epoch["host_wait"] += host - self._host_ready
        self._host_start = host
        epoch["marks"].append([self._mark(), None])
        epoch["images"] += len(batch[1])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self._epoch["marks"][-1][1] = self._mark()
        if self._catching is not None:  # one whole cycle counted: the loop between steps, then step 2
            self._count_syncs()
        elif (
            self.cuda
            and self.sync_check
            and self.syncs is None
            and batch_index == 1
            and trainer.current_epoch == min(1, trainer.max_epochs - 1)
        ):
            self._start_counting_syncs()
        now = time.perf_counter()
        self._epoch["host_step"] += now - self._host_start
        self._host_ready = now

    def _start_counting_syncs(self) -> None:
        try:
            self._catching = warnings.catch_warnings(record=True)
            self._caught = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as error:  # a measurement aid: its failure must not stop the measurement
            self.notes.append(f"sync count failed: {error!r}")
            self._catching = None

    def _count_syncs(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._catching.__exit__(None, None, None)
        self._catching = None
        places: dict[str, int] = {}
        for caught in self._caught:
            if "synchroniz" in str(caught.message):
                place = f"{Path(caught.filename).parent.name}/{Path(caught.filename).name}:{caught.lineno}"
                places[place] = places.get(place, 0) + 1
        self.syncs = {"count": sum(places.values()), "places": places}

    def on_validation_start(self, trainer, module) -> None:
        if self._catching is not None:  # the epoch ended inside the window (fewer than 3 steps): no count
            torch.cuda.set_sync_debug_mode(0)
            self._catching.__exit__(None, None, None)
            self._catching = None
            self.notes.append("sync count: the epoch has fewer than 3 steps, not counted")
        self._validation_start = self._now()
        if self.profiler is not None:
            self.profiler.phase = "val"

    def on_validation_end(self, trainer, module) -> None:
        seconds = self._now() - self._validation_start
        if self.profiler is not None:
            self.profiler.phase = "train"
        if trainer.sanity_checking:
            self.sanity_s += seconds
        else:
            self.validation_s.append(seconds)

    def on_train_epoch_end(self, trainer, module) -> None:
        epoch = self._epoch
        if self.cuda:
            torch.cuda.synchronize()
        waits, steps = [], []
        previous = epoch["start"]
        for start, end in epoch["marks"]:
            if end is None:
                continue
            waits.append(self._seconds(previous, start))
            steps.append(self._seconds(start, end))
            previous = end
        self.epochs.append(
            {
                "epoch": epoch["epoch"],
                "images": epoch["images"],
                "wait_s": sum(waits),
                "step_s": sum(steps),
                "steps": len(steps),
                "host_wait_s": epoch["host_wait"],
                "host_step_s": epoch["host_step"],
            }
        )

    def on_fit_end(self, trainer, module) -> None:
        fit_s = self._now() - self.fit_start
        result = {
            "fit_start_wall": self.fit_start_wall,
            "fit_end_wall": time.time(),
            "callback_fit_s": fit_s,
            "epochs": self.epochs,
            "validation_s": self.validation_s,
            "sanity_s": self.sanity_s,
            "syncs": self.syncs,
            "notes": self.notes,
            "device": str(module.device),
            "host": self.profiler.totals if self.profiler is not None else None,
        }
        if self.cuda:
            result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# The driver.
