"""What the benchmarks share: the device, an idle machine, a subset of a data set, and resource sampling."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

IDLE_LOAD = 1.5  # 1-minute load average above which the machine counts as busy (this one has 2 cores)
QUIET_CORES = 0.15  # CPU use of other processes (in cores) above which a measurement is not trusted


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda`, or None: cuda when available."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return torch.device(name)


def machine(device: torch.device) -> str:
    """One line on where the figures come from."""
    cpu = (
        f"{psutil.cpu_count(logical=True)}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads"
    )
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; host {cpu}"
    return cpu


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def revision() -> str:
    """The checkout's commit (with `-dirty` for uncommitted changes), or "unknown" outside git."""
    try:
        return (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def subset(root: Path, target: Path, per_class: int | dict[str, int]) -> Path:
    """The first `per_class` images of each class folder (sorted by name), hard-linked (or copied) to target;
    `per_class` a dict: that many of each class it names, the other classes left out."""
    counts = per_class if isinstance(per_class, dict) else None
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if counts is not None and class_dir.name not in counts:
            continue
        (target / class_dir.name).mkdir(parents=True)
        count = counts[class_dir.name] if counts is not None else per_class
        for image in sorted(p for p in class_dir.iterdir() if p.is_file())[:count]:
            try:
                os.link(image, target / class_dir.name / image.name)
            except OSError:
                shutil.copy2(image, target / class_dir.name / image.name)
    return target


def add_smoke_argument(parser) -> None:
    """--smoke: the script end to end in seconds, on tiny generated images, so that the suite sees it run
    (tests/test_benches.py); its figures mean nothing."""
    parser.add_argument(
        "--smoke", action="store_true", help="seconds, on tiny generated images: checks that it runs, measures nothing"
    )


def smoke_images(target: Path, per_class: int = 8, size: int = 48) -> Path:
    """A tiny image folder, target/{defective,functional}/*.png: noise, with a bright disc in one class and a bright
    bar in the other (something to learn); the classes are ELPV's, so benches that name them work unchanged."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    shapes = {
        "defective": (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2,
        "functional": abs(x - size / 2) < size / 8,
    }
    for name, mask in shapes.items():
        (target / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.normal(60, 25, size=(size, size, 3))
            pixels[mask] += 120
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target / name / f"{name}_{index:03d}.png")
    return target


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def others_busy(window_s: float = 2.0) -> float:
    """Cores that other processes kept busy over the next `window_s` seconds (this process sleeps meanwhile)."""
    process = psutil.Process()
    own_start, busy_start = _tree_cpu_seconds(process), _machine_busy_seconds()
    time.sleep(window_s)
    own, busy = _tree_cpu_seconds(process) - own_start, _machine_busy_seconds() - busy_start
    return max(0.0, busy - own) / window_s


def wait_until_idle(max_wait_s: float, use_load: bool = True, poll_s: float = 30.0) -> float:
    """Waits, up to `max_wait_s`, until other processes use under `QUIET_CORES` and (with `use_load`) the
    1-minute load average is at most `IDLE_LOAD`; returns the load average then.

    A negative `max_wait_s` checks nothing (smoke runs). The load average lags by a minute or so, and our own
    previous measurement keeps it high: between two measurements only the other processes' CPU use is checked
    (`use_load=False`).
    """
    if max_wait_s < 0:  # a smoke run (`--smoke`): its figures mean nothing, so the machine's state does not matter
        return load()
    waited = 0.0
    while True:
        current, others = load(), others_busy()
        if others < QUIET_CORES and (not use_load or current <= IDLE_LOAD):
            return current
        if waited >= max_wait_s:
            print(
                f"WARNING: still busy after {waited:.0f} s (load average {current:.2f}, other processes "
                f"{others:.2f} cores): measuring anyway",
                flush=True,
            )
            return current
        print(
            f"machine busy (load average {current:.2f}, other processes {others:.2f} cores): waiting "
            f"{poll_s:.0f} s ({waited:.0f} of {max_wait_s:.0f} s waited)",
            flush=True,
        )
        time.sleep(poll_s)
        waited += poll_s


def add_idle_arguments(parser, unit: str) -> None:
    """--max-wait and --retries: how long to wait for an idle machine, and how often to measure a `unit` again."""
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600,
        help="seconds to wait for an idle machine (load average <= 1.5 at the start, other "
        f"processes under 0.15 cores before each {unit})",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help=f"times a {unit} is measured again when other processes used the CPU meanwhile",
    )


def release_memory() -> None:
    """Frees what the previous measurement left, so the next one's memory baseline is not flattered."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ResourceSampler:
    """Samples, in a thread, this process's RSS (peak above the start), its children's RSS (data-loader workers),
    and how much of the machine other processes used meanwhile (in cores, averaged): a measurement is only as
    good as the machine was idle while it ran. On CUDA, the peak allocated GPU memory too.

    Use as a context manager; read `.result()` afterwards.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0
        self.children_peak = 0
        self.load_start = 0.0

    def __enter__(self) -> ResourceSampler:
        release_memory()
        self.load_start = load()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)
        self._cpu_start = self._own_cpu_seconds()
        self._all_start = _machine_busy_seconds()
        self._wall_start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._wall_start
        # Our process's own CPU time, plus its children's (the workers) as last seen alive by the sampler.
        own = self._own_cpu_seconds() - self._cpu_start + sum(self._child_cpu.values())
        busy = _machine_busy_seconds() - self._all_start
        self.other_cores = max(0.0, busy - own) / wall if wall > 0 else 0.0
        self.own_cores = own / wall if wall > 0 else 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device) - self.cuda_baseline

    def _own_cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def _run(self) -> None:
        self._child_cpu: dict[int, float] = {}
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                children_rss = 0
                for child in self.process.children(recursive=True):
                    try:
                        info = child.as_dict(["memory_info", "cpu_times"])
                    except psutil.Error:
                        continue
                    if info["memory_info"] is not None:
                        children_rss += info["memory_info"].rss
                    if info["cpu_times"] is not None:
                        self._child_cpu[child.pid] = info["cpu_times"].user + info["cpu_times"].system
                self.children_peak = max(self.children_peak, children_rss)
            except psutil.Error:
                continue

    def result(self) -> dict:
        """Peak memory above the start (MiB) and the load seen: the 1-minute average at the start, and the
        cores other processes kept busy on average during the measurement."""
        result = {
            "rss_peak_mib": (self.peak - self.baseline) / 2**20,
            "workers_rss_peak_mib": self.children_peak / 2**20,
            "load_start": self.load_start,
            "other_cores": self.other_cores,
            "own_cores": self.own_cores,
        }
        if self.device.type == "cuda":
            result["cuda_peak_mib"] = self.cuda_peak / 2**20
        return result


def _tree_cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)
