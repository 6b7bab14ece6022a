r"""Every GPU measurement of issue 16 in one run (about 8 minutes on one H200): training images/s over the whole fit,
validation included, steady-state images/s, the fraction of the step the GPU waits on data, peak GPU memory, and
the wall time of a whole depth study (5 depths x 3 seeds).

Each cell is one real training run, `python train.py <overrides>` in a subprocess (start-up, image cache, feature
cache, validation, checkpoints and the final evaluation all as a user gets them), on ELPV at 224 px, bf16-mixed,
channels-last (`trainer=gpu`), random init (`model.weights=null`: torchvision's weights would need a download; the
step costs what a pretrained one does). A cell is `model:unfreeze:path:batch[:extra...]`:

- path `files`:    data.cache_images=false: loader workers decode, augment and normalise every file every epoch;
- path `cached`:   data.cache_images=true: decoded once into memory, augmented in the loader workers;
- path `device`:   data.cache_images=true data.augment_on=device: workers stack uint8 images, the GPU augments;
- path `features`: data.augment=false strategy.cache_features=true: the frozen part runs once (unfreeze=0 trains
                   the head on cached features);
- extras: `compile` (model.compile=true), `graphs` (model.compile=reduce-overhead: CUDA graphs), `fp32`
  (trainer.precision=32-true), `nchw` (model.channels_last=false), `wN` (data.num_workers=N), `nometrics` (a bench
  experiment, not a setting: the training steps skip the torchmetrics updates, whose argument checks and bincounts
  synchronise the GPU every step; shows what removing those syncs from `module.py` would gain).

A `StepTimer` callback (added with `+callbacks.gpu_timer=...`, so the run is otherwise untouched) records per step,
with CUDA events and no synchronisation inside the epoch: the **data wait** (GPU time from the end of the previous
step, or the epoch's start, to the start of this one: the loader, the copy to the GPU, device-side augmentation,
and any GPU idle while the host waits for them) and the **step** (forward, backward, optimizer). data_wait =
sum(wait) / sum(wait + step). It also takes the host's own wait for the loader, the validation and the rest of each
epoch (checkpoints, hooks), the peak GPU memory, and, at one step, how many GPU->host synchronisations the step
makes (`torch.cuda.set_sync_debug_mode`). The cells run in the order given (`--cells`; the default puts the
depth study, `study`: `-m unfreeze=0,1,2,4,all seed=0,1,2` in one process, or `experiment=depth_study` where conf/
has a sweep of that name, after the four main cells, and `model.compile` last): a `--budget-seconds` guard skips
what would not finish in time and says so, and stops a run that would overrun (a cut study is extrapolated from
its finished runs).

It prints a table (model, depth, data path, images/s, data-wait fraction, GPU memory, ...) and, last, a line
`gpu mobilenet_v2 unfreeze=all images_per_second X data_wait Y` (the fastest MobileNetV2 `unfreeze=all` cell;
`cpu ...` with --device cpu). The table, that line, all figures (JSON) and the runs' logs also go to --out
(default $OUT, else a temporary folder).

Preparation, on a machine with the project's virtual environment and `pip` (the device machine has PyTorch,
Lightning, timm, torchmetrics and psutil, but no hydra-core, omegaconf, antlr4 or elpv-dataset; the tree that
travels is limited to 64 MiB):

    python bench/elpv_compact.py                     # .elpv/elpv: the 2,624 ELPV images as grayscale JPEG q92, 36 MiB
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: a pure-Python wheel
    python bench/gpu.py --device cpu --tiny          # the same code path on the CPU (~8 min on 2 busy cores)

Then one device call, carry [".whl", ".elpv"], timeout_s 600 (the 480 s budget leaves two minutes spare):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi --query-gpu=name,memory.used,clocks.sm \
        --format=csv; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu.py --data-root .elpv/elpv \
        --budget-seconds 480 2>&1 | tee $OUT/gpu_console.txt

bench/RESULTS.md has it on one line (351 characters). `--tiny` on the CPU: 64 px, 1 epoch, 20 images a class,
4 cells and a 2-run study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.profilers import Profiler

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import machine, revision, subset, today  # noqa: E402

MODELS = {"mobilenet_v2": "mobilenet_v2", "mnv2": "mobilenet_v2", "resnet50": "resnet50", "r50": "resnet50"}
PATHS = {
    "files": ["data.augment=basic", "data.cache_images=false", "data.augment_on=loader"],
    "cached": ["data.augment=basic", "data.cache_images=true", "data.augment_on=loader"],
    "device": ["data.augment=basic", "data.cache_images=true", "data.augment_on=device"],
    "features": ["data.augment=false", "strategy.cache_features=true"],
}
EXTRAS = {
    "compile": ["model.compile=true"],
    "graphs": ["model.compile=reduce-overhead"],
    "fp32": ["trainer.precision=32-true"],
    "nchw": ["model.channels_last=false"],
    "nometrics": ["+callbacks.gpu_timer.train_metrics=false"],
}
# In order of priority: the guard skips from the end. "study" is the depth study; compiling, the least certain
# cost (a minute or two of compilation), comes last.
DEFAULT_CELLS = [
    "mobilenet_v2:all:device:128",
    "mobilenet_v2:all:files:128",
    "resnet50:all:device:128",
    "mobilenet_v2:all:cached:128",
    "study",
    "mobilenet_v2:all:device:32",
    "mobilenet_v2:all:device:32:nometrics",
    "mobilenet_v2:all:device:256",
    "mobilenet_v2:all:device:128:nchw",
    "mobilenet_v2:0:features:128",
    "resnet50:all:files:128",
    "mobilenet_v2:all:device:128:compile",
]
TINY_CELLS = [
    "mobilenet_v2:all:device:16",
    "mobilenet_v2:all:files:16",
    "mobilenet_v2:0:features:16",
    "mobilenet_v2:all:device:16:nometrics",
    "study",
]
STUDY_DEPTHS = "0,1,2,4,all"
STUDY_SEEDS = "0,1,2"
# Seconds a cell needs at least to be worth starting (start-up alone is 5-15 s); compiling takes a minute or two.
MIN_CELL_S = 30
MIN_COMPILE_S = 150
MIN_STUDY_S = 60


# ---------------------------------------------------------------------------------------------------------------
# Inside each training run: the callback (train.py instantiates it from +callbacks.gpu_timer._target_=gpu.StepTimer).


class HostProfiler(Profiler):
    """Lightning's profiler hook points, timed for three actions only (host clocks): the training loader's `next`
    (the host waiting for a batch), the batch's transfer to the device (with on_after_batch_transfer: device-side
    augmentation is launched there), and ModelCheckpoint's hooks (saving checkpoints). Everything else passes
    through at the cost of a substring test. Added with `+trainer.profiler._target_=gpu.HostProfiler`."""

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


@dataclass
class Cell:
    spec: str
    model: str
    unfreeze: str
    path: str
    batch: int
    extras: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.replace(":", "-")

    @property
    def experiment(self) -> bool:
        """A bench experiment, not a setting a user can choose: never the headline."""
        return "nometrics" in self.extras

    def overrides(self) -> list[str]:
        extra = [
            o
            for name in self.extras
            for o in (EXTRAS[name] if name in EXTRAS else [f"data.num_workers={int(name[1:])}"])
        ]
        return [
            f"model={self.model}",
            f"unfreeze={self.unfreeze}",
            f"data.batch_size={self.batch}",
            *PATHS[self.path],
            *extra,
        ]


def parse_cell(spec: str) -> Cell:
    parts = spec.split(":")
    usage = f"cell {spec!r}: use model:unfreeze:path:batch[:extra...], e.g. mobilenet_v2:all:device:128"
    if len(parts) < 4:
        raise SystemExit(usage)
    model, unfreeze, path, batch, *extras = parts
    if model not in MODELS:
        raise SystemExit(f"{usage}; models: {', '.join(MODELS)}")
    if path not in PATHS:
        raise SystemExit(f"{usage}; paths: {', '.join(PATHS)}")
    for extra in extras:
        if extra not in EXTRAS and not (extra[:1] == "w" and extra[1:].isdigit()):
            raise SystemExit(f"{usage}; extras: {', '.join(EXTRAS)}, wN (N loader workers)")
    if not batch.isdigit():
        raise SystemExit(usage)
    return Cell(spec, MODELS[model], unfreeze, path, int(batch), extras)


def common_overrides(args, data_root: Path, device: str) -> list[str]:
    return [
        "model.weights=null",
        f"data.root={data_root}",
        f"data.image_size={args.image_size}",
        "trainer=gpu" if device == "cuda" else "trainer=cpu",
        "trainer.enable_progress_bar=false",
        f"seed={args.seed}",
    ]


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_train(arguments: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, float]:
    """Runs `python train.py ARGUMENTS` from the repo root; (exit code or None if stopped at `timeout`, seconds)."""
    command = [sys.executable, str(REPO / "train.py"), *arguments]
    started = time.perf_counter()
    with open(log, "w") as output:
        output.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        output.flush()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the run and its loader workers
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
    return code, time.perf_counter() - started


def last_lines(path: Path, count: int = 3) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-300:]


def measure_cell(cell: Cell, args, data_root: Path, device: str, work: Path, env: dict, budget: Budget) -> dict:
    run_dir = work / "runs" / cell.name
    timer_file = run_dir / "timer.json"
    arguments = [
        *common_overrides(args, data_root, device),
        *cell.overrides(),
        f"trainer.max_epochs={args.epochs}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.gpu_timer._target_=gpu.StepTimer",
        f"+callbacks.gpu_timer.path={timer_file}",
        "+trainer.profiler._target_=gpu.HostProfiler",
    ]
    row = {
        "cell": cell.spec,
        "model": cell.model,
        "unfreeze": cell.unfreeze,
        "path": cell.path,
        "batch": cell.batch,
        "extras": cell.extras,
        "epochs": args.epochs,
        "experiment": cell.experiment,
        "command": "python train.py " + " ".join(arguments),
    }
    launched = time.time()
    code, wall = run_train(arguments, work / "logs" / f"{cell.name}.log", env, budget.left() - args.reserve)
    row.update(wall_s=wall, exit_code=code)
    if code != 0:
        row["status"] = (
            "stopped at the budget"
            if code is None
            else f"failed ({code}): " + last_lines(work / "logs" / f"{cell.name}.log")
        )
        return row
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row.update(
        status="done",
        images_per_s=metrics["time/train_images_per_second"],
        fit_s=metrics["time/fit_seconds"],
        val_acc=metrics.get("val/acc"),
        test_acc=metrics.get("test/acc"),
    )
    if timer_file.is_file():
        timer = json.loads(timer_file.read_text())
        row.update(summarise_timer(timer, cell.batch))
        row["before_fit_s"] = timer["fit_start_wall"] - launched
        row["after_fit_s"] = launched + wall - timer["fit_end_wall"]
        row["setup_in_fit_s"] = row["fit_s"] - timer["callback_fit_s"]
    else:
        row["status"] = "done, no timer file"
    return row


def summarise_timer(timer: dict, batch: int) -> dict:
    epochs = timer["epochs"]
    wait = sum(e["wait_s"] for e in epochs)
    step = sum(e["step_s"] for e in epochs)
    steady = [e for e in epochs if e["epoch"] > 0] or epochs
    steady_time = sum(e["wait_s"] + e["step_s"] for e in steady)
    host_between = sum(e["host_wait_s"] for e in epochs)
    host_total = host_between + sum(e["host_step_s"] for e in epochs)
    host = timer.get("host") or {}
    steps = sum(e["steps"] for e in epochs)
    train_s = wait + step
    validation_s = sum(timer["validation_s"])
    result = {
        "data_wait": wait / train_s if train_s else float("nan"),
        "steady_data_wait": sum(e["wait_s"] for e in steady) / steady_time if steady_time else float("nan"),
        "steady_images_per_s": sum(e["images"] for e in steady) / steady_time if steady_time else float("nan"),
        # The host's wait for the loader's next batch, over the host's time in the training loop.
        "host_loader_wait": host["train/fetch"] / host_total if host_total and "train/fetch" in host else float("nan"),
        "host_between_steps": host_between / host_total if host_total else float("nan"),
        "host_transfer_s": host.get("train/transfer"),
        "checkpoint_s": host.get("train/checkpoint"),
        "step_ms": 1000 * step / steps if steps else float("nan"),
        "train_s": train_s,
        "validation_s": validation_s,
        "sanity_s": timer["sanity_s"],
        # Checkpoints, epoch-end hooks, the loop between epochs (the callback's fit: on_fit_start to on_fit_end).
        "other_in_fit_s": timer["callback_fit_s"] - train_s - validation_s - timer["sanity_s"],
        "syncs_per_step": timer["syncs"]["count"] if timer.get("syncs") else None,
        "sync_places": timer["syncs"]["places"] if timer.get("syncs") else None,
        "gpu_peak_gib": timer.get("gpu_peak_gib"),
        "timer_notes": timer.get("notes", []),
    }
    return result


def study_arguments(args, data_root: Path, device: str, sweep_dir: Path) -> tuple[list[str], str]:
    experiment = REPO / "conf" / "experiment" / "depth_study.yaml"
    base = [
        *common_overrides(args, data_root, device),
        f"model={args.study_model}",
        f"data.batch_size={args.study_batch}",
        *PATHS[args.study_path],
        f"trainer.max_epochs={args.study_epochs}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    if experiment.is_file() and "sweeper" in experiment.read_text() and not args.study_explicit:
        # Its own depths and seeds; the 15-run shape is checked from what it ran.
        return ["-m", "experiment=depth_study", *base], "experiment=depth_study"
    return [
        "-m",
        f"unfreeze={args.study_depths}",
        f"seed={args.study_seeds}",
        *base,
    ], f"-m unfreeze={args.study_depths} seed={args.study_seeds}"


def planned_runs(args, how: str) -> int:
    """Runs the study will make: the explicit sweep's depths x seeds, or the product of the experiment's sweep."""
    if how != "experiment=depth_study":
        return len(args.study_depths.split(",")) * len(args.study_seeds.split(","))
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = OmegaConf.load(REPO / "conf" / "experiment" / "depth_study.yaml").hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{key}={values}" for key, values in params.items()])
    return math.prod(len(list(override.sweep_string_iterator())) for override in overrides)


def measure_study(args, data_root: Path, device: str, work: Path, env: dict, budget: Budget) -> dict:
    sweep_dir = work / "study"
    arguments, how = study_arguments(args, data_root, device, sweep_dir)
    planned = planned_runs(args, how)
    row = {
        "cell": "study",
        "how": how,
        "planned_runs": planned,
        "epochs": args.study_epochs,
        "command": "python train.py " + " ".join(arguments),
    }
    code, wall = run_train(arguments, work / "logs" / "study.log", env, budget.left() - args.reserve)
    finished = sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name)) if sweep_dir.is_dir() else []
    metrics = [json.loads(p.read_text()) for p in finished]
    row.update(wall_s=wall, exit_code=code, finished_runs=len(metrics))
    if metrics:
        row["mean_images_per_s"] = sum(m["time/train_images_per_second"] for m in metrics) / len(metrics)
        row["fit_s_sum"] = sum(m["time/fit_seconds"] for m in metrics)
        row["val_acc_by_run"] = [m.get("val/acc") for m in metrics]
    if code == 0:
        row["status"] = "done"
        row["study_wall_s"] = wall
    elif metrics:
        row["status"] = (
            "stopped at the budget" if code is None else f"failed ({code})"
        ) + f" after {len(metrics)} of {planned} runs: wall extrapolated"
        row["study_wall_s"] = wall / len(metrics) * planned
    else:
        row["status"] = (
            "stopped at the budget, no run finished"
            if code is None
            else f"failed ({code}): " + last_lines(work / "logs" / "study.log")
        )
    return row


def rate(value: float | None) -> str:
    """Images a second: whole numbers, with a decimal under 100 (a CPU dry run)."""
    return fmt(value, 0 if value is not None and value >= 100 else 1)


def fmt(value, digits: int = 1, empty: str = "-") -> str:
    if value is None:
        return empty
    if isinstance(value, float):
        if value != value:
            return empty
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: list[dict], device: str) -> str:
    memory = "GPU peak GiB" if device == "cuda" else "GPU peak GiB (n/a on CPU)"
    lines = [
        f"| model | unfreeze | data path | batch | extras | images/s (whole fit) | steady images/s | data wait "
        f"(GPU) | steady data wait | host loader wait | step ms | syncs/step | {memory} | fit s = train + val + "
        f"checkpoints + other + setup | start-up s | after fit s | val acc | status |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["cell"] == "study":
            continue
        split = "-"
        if r.get("fit_s") and r.get("train_s") is not None:
            checkpoints = r.get("checkpoint_s") or 0.0
            split = (
                f"{fmt(r['fit_s'])} = {fmt(r['train_s'])} + {fmt(r['validation_s'] + r['sanity_s'])} + "
                f"{fmt(checkpoints)} + {fmt(r['other_in_fit_s'] - checkpoints)} + {fmt(r['setup_in_fit_s'])}"
            )
        lines.append(
            f"| {r['model']} | {r['unfreeze']} | {r['path']} | {r['batch']} | {'+'.join(r['extras']) or '-'} "
            f"| {rate(r.get('images_per_s'))} | {rate(r.get('steady_images_per_s'))} "
            f"| {fmt(r.get('data_wait'), 3)} | {fmt(r.get('steady_data_wait'), 3)} "
            f"| {fmt(r.get('host_loader_wait'), 3)} | {fmt(r.get('step_ms'))} | {fmt(r.get('syncs_per_step'))} "
            f"| {fmt(r.get('gpu_peak_gib'), 2)} | {split} | {fmt(r.get('before_fit_s'))} "
            f"| {fmt(r.get('after_fit_s'))} | {fmt(r.get('val_acc'), 3)} | {r['status']} |"
        )
    return "\n".join(lines)


def skipped_row(item: Cell | str, args) -> dict:
    if item == "study":
        return {
            "cell": "study",
            "status": "skipped (budget)",
            "how": "-",
            "planned_runs": 0,
            "finished_runs": 0,
            "wall_s": 0.0,
            "epochs": args.study_epochs,
        }
    return {
        "cell": item.spec,
        "status": "skipped (budget)",
        "model": item.model,
        "unfreeze": item.unfreeze,
        "path": item.path,
        "batch": item.batch,
        "extras": item.extras,
        "experiment": item.experiment,
    }


def study_line(row: dict) -> str:
    return (
        f"depth study ({row['how']}, {row['epochs']} epochs): {row['status']}; {row['finished_runs']} of "
        f"{row['planned_runs']} runs in {fmt(row['wall_s'])} s wall; whole study "
        f"{fmt(row.get('study_wall_s'))} s; mean {rate(row.get('mean_images_per_s'))} images/s over each fit"
    )


def headline(rows: list[dict], device: str) -> tuple[str, dict | None]:
    candidates = [
        r
        for r in rows
        if r["cell"] != "study"
        and r["model"] == "mobilenet_v2"
        and r["unfreeze"] == "all"
        and not r["experiment"]
        and r.get("images_per_s")
    ]
    best = max(candidates, key=lambda r: r["images_per_s"], default=None)
    prefix = "gpu" if device == "cuda" else "cpu"
    if best is None:
        return f"{prefix} mobilenet_v2 unfreeze=all images_per_second nan data_wait nan", None
    return (
        f"{prefix} mobilenet_v2 unfreeze=all images_per_second {rate(best['images_per_s']).replace(',', '')} "
        f"data_wait {best.get('data_wait', float('nan')):.3f}"
    ), best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a CPU dry run: 64 px, 1 epoch, 20 images a class, 4 small cells, a 2-run study",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="an image folder (default: .elpv/elpv from bench/elpv_compact.py, else the ELPV demo)",
    )
    parser.add_argument("--per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument(
        "--cells",
        default=None,
        help="comma-separated model:unfreeze:path:batch[:extra...] or "
        f"study, run in that order (default: {','.join(DEFAULT_CELLS)})",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each cell (default 10; --tiny 1)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --tiny 64")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-study", action="store_true", help="leave the depth study out")
    parser.add_argument(
        "--study-depths",
        default=None,
        help=f"default {STUDY_DEPTHS}; --tiny 0,all; given, it runs instead of experiment=depth_study",
    )
    parser.add_argument("--study-seeds", default=None, help=f"default {STUDY_SEEDS}; --tiny 0")
    parser.add_argument("--study-epochs", type=int, default=None, help="default 10; --tiny 1")
    parser.add_argument("--study-model", default="mobilenet_v2")
    parser.add_argument("--study-batch", type=int, default=None, help="default 128; --tiny 16")
    parser.add_argument("--study-path", default="device", choices=tuple(p for p in PATHS if p != "features"))
    parser.add_argument(
        "--study-explicit",
        action="store_true",
        help="run the explicit -m unfreeze=... seed=... sweep even where experiment=depth_study exists",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=480,
        help="stop starting cells, and stop a running one, so that all ends within this (default 480)",
    )
    parser.add_argument("--reserve", type=float, default=15, help="seconds kept for the report (default 15)")
    parser.add_argument(
        "--out", default=None, help="where the table, JSON and logs go (default $OUT, else a temporary folder)"
    )
    args = parser.parse_args()
    # Depths or seeds given on the command line are a sweep of their own, not the experiment's.
    # --tiny keeps its 2-run study: the experiment's 25 runs are no dry run.
    args.study_explicit = (
        args.study_explicit or args.tiny or args.study_depths is not None or args.study_seeds is not None
    )
    tiny = args.tiny
    args.epochs = args.epochs or (1 if tiny else 10)
    args.image_size = args.image_size or (64 if tiny else 224)
    args.study_depths = args.study_depths or ("0,all" if tiny else STUDY_DEPTHS)
    args.study_seeds = args.study_seeds or ("0" if tiny else STUDY_SEEDS)
    args.study_epochs = args.study_epochs or (1 if tiny else 10)
    args.study_batch = args.study_batch or (16 if tiny else 128)
    per_class = args.per_class or (20 if tiny else None)
    specs = args.cells.split(",") if args.cells else TINY_CELLS if tiny else DEFAULT_CELLS
    items: list[Cell | str] = [
        s if s == "study" else parse_cell(s) for s in specs if not (s == "study" and args.no_study)
    ]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    budget = Budget(args.budget_seconds)

    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="finetune-gpu-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="finetune-gpu-bench-") as scratch:
        work = Path(scratch)
        (work / "logs").mkdir()
        data_root = Path(args.data_root).expanduser().resolve() if args.data_root else default_data_root()
        if per_class:
            data_root = subset(data_root, work / "data", per_class)
        env = dict(os.environ)
        env.update(
            {
                # The callback's module (this file) for the runs; src/ where finetune is not installed (device machine).
                "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(REPO / "src"), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
                "HYDRA_FULL_ERROR": "1",  # a failed cell's log then ends with its traceback
                # The scan's verdicts are kept here: only the first run decodes every file to check it.
                "FINETUNE_CACHE": str(work / "cache"),
                "HF_HUB_OFFLINE": "1",
            }
        )
        header = [
            f"# {' '.join(['python', 'bench/gpu.py', *sys.argv[1:]])}",
            f"# {today()}; {machine(torch.device(device))}; finetune {revision()}; budget {args.budget_seconds:.0f} s",
            f"# data {data_root} ({f'first {per_class} a class' if per_class else 'all images'}), {args.image_size} "
            f"px, {args.epochs} epochs a cell, random init, "
            + ("bf16-mixed, channels-last (trainer=gpu)" if device == "cuda" else "fp32 (trainer=cpu)"),
        ]
        print("\n".join(header), flush=True)
        rows: list[dict] = []
        for item in items:
            name = "study" if item == "study" else item.spec
            compiles = item != "study" and bool({"compile", "graphs"} & set(item.extras))
            needed = MIN_STUDY_S if item == "study" else MIN_COMPILE_S if compiles else MIN_CELL_S
            if tiny:
                needed = 5
            if budget.left() - args.reserve < needed:
                print(
                    f"skipped {name}: {budget.left():.0f} s of the budget left, it needs about {needed} s", flush=True
                )
                rows.append(skipped_row(item, args))
                continue
            if item == "study":
                row = measure_study(args, data_root, device, work, env, budget)
                print(study_line(row), flush=True)
            else:
                row = measure_cell(item, args, data_root, device, work, env, budget)
                print(
                    f"{name}: {row['status']}, {rate(row.get('images_per_s'))} images/s over the fit, data "
                    f"wait {fmt(row.get('data_wait'), 3)}, {fmt(row['wall_s'])} s wall "
                    f"({budget.left():.0f} s of the budget left)",
                    flush=True,
                )
            rows.append(row)
            save(out, work, header, rows, device)  # after every cell: a run stopped from outside keeps what it has
    report = save(out, None, header, rows, device)
    print("\n" + "\n".join(report[len(header) + 1 :]), flush=True)


def save(out: Path, work: Path | None, header: list[str], rows: list[dict], device: str) -> list[str]:
    """Writes the report (table, notes, last line), the figures as JSON and the runs' logs under `out`."""
    if work is not None:
        with tarfile.open(out / "gpu_logs.tar.gz", "w:gz") as archive:
            archive.add(work / "logs", arcname="logs")
            for timer in sorted(work.glob("runs/*/timer.json")):
                archive.add(timer, arcname=f"timers/{timer.parent.name}.json")
    line, best = headline(rows, device)
    study = next((r for r in rows if r["cell"] == "study"), None)
    report = [*header, "", table(rows, device), ""]
    syncs = {place for r in rows for place in (r.get("sync_places") or {})}
    if syncs:
        report.append("GPU->host synchronisations in one training step, from: " + ", ".join(sorted(syncs)))
    for r in rows:
        for note in r.get("timer_notes") or []:
            report.append(f"note ({r['cell']}): {note}")
    if study is not None:
        report.append(study_line(study))
    if best is not None:
        report.append(f"headline cell: {best['cell']} ({best['command']})")
    report.append(line)
    (out / "gpu_results.md").write_text("\n".join(report) + "\n")
    (out / "gpu_results.json").write_text(json.dumps({"header": header, "rows": rows, "last_line": line}, indent=1))
    return report


def default_data_root() -> Path:
    compact = REPO / ".elpv" / "elpv"
    if compact.is_dir():
        return compact
    from finetune.data.demo import demo_root

    return demo_root("elpv")


if __name__ == "__main__":
    main()
