"""bench/gpu.py's cells: what each is (`model:unfreeze:path:batch[:extra...]`, or the depth study), and how one runs
as a real `python train.py` in a subprocess, its figures read back from metrics.json and the step timer's JSON.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

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
        # The CPU dry run stays in fp32, as its header says (trainer=cpu's precision=auto could measure bf16 faster).
        *(["trainer=gpu"] if device == "cuda" else ["trainer=cpu", "trainer.precision=32-true"]),
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
        "+callbacks.gpu_timer._target_=gpu_bench.timer.StepTimer",
        f"+callbacks.gpu_timer.path={timer_file}",
        "+trainer.profiler._target_=gpu_bench.timer.HostProfiler",
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
