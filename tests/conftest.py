"""Shared fixtures: a small generated image folder, and a runner for the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "stripes")

# The smallest real run: MobileNetV2 at random init (nothing to download) on 32 px images, in this process.
TINY = ("model=mobilenet_v2", "model.weights=null", "data.image_size=32", "data.batch_size=8", "data.num_workers=0")

# A tiny run whose resumption is exact: deterministic kernels, a constant rate, one loader worker.
RESUME = (
    "model=mobilenet_v2",
    "model.weights=null",
    "data.image_size=32",
    "data.num_workers=1",
    "data.batch_size=8",
    "data.augment=basic",  # augmentation's random state must resume too
    "strategy.scheduler=constant",
    "trainer.deterministic=true",
    # trainer.precision=auto decides on a timing, which the straight and the interrupted run's processes could read
    # differently (a resumed run keeps its checkpoint's precision; the straight run has no checkpoint to read).
    "trainer.precision=32-true",
)


def draw(kind: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy picture of one of three shapes: learnable, but not from the first pixel."""
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = rng.integers(size // 3, 2 * size // 3, size=2)
    if kind == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 < (size // 4) ** 2
    elif kind == "square":
        mask = (abs(x - cx) < size // 5) & (abs(y - cy) < size // 5)
    else:
        mask = (x // 4) % 2 == 0
    pixels = rng.normal(60, 25, size=(size, size, 3))
    pixels[mask] += 120
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Writes `per_class` PNGs for each of CLASSES under root/<class>/."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            draw(kind, rng).save(root / kind / f"{kind}_{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three classes of twelve 48x48 images: 9/2/1 per class after the default 0.7/0.2/0.1 split."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run that must not reach the network, with its own caches."""
    env = dict(os.environ)
    env.update(
        {
            "TORCH_HOME": str(tmp_path / "torch_home"),
            "HF_HUB_OFFLINE": "1",
            # Any download attempt fails at once, online or not: nothing listens on port 9 here.
            "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "PYTHONWARNINGS": "ignore",
            # The demo data set is materialised here, not in the user's cache.
            "FINETUNE_CACHE": str(tmp_path / "cache"),
            # tests/faults.py: callbacks that interrupt a run at an exact step (+callbacks.fault._target_=faults...).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        }
    )
    return env


def run_cli(
    tmp_path: Path, *overrides: str, check: bool = True, run_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """Runs `python train.py` from the repo root, its run directory in tmp_path/run (or run_dir)."""
    return _train(tmp_path, [f"hydra.run.dir={run_dir or tmp_path / 'run'}", *overrides], check)


def run_multirun(tmp_path: Path, sweep_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a sweep, `python train.py -m ...`, from the repo root, its jobs in sweep_dir/0, sweep_dir/1, ..."""
    return _train(tmp_path, ["-m", f"hydra.sweep.dir={sweep_dir}", *overrides], check)


def _train(tmp_path: Path, arguments: list[str], check: bool) -> subprocess.CompletedProcess:
    # Hydra's flags (-m) must come before the overrides.
    command = [sys.executable, str(REPO / "train.py"), *arguments, "trainer.enable_progress_bar=false"]
    result = subprocess.run(command, cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit code {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, image_folder) -> Path:
    """The folder of one tiny training run on `image_folder`, shared by the tests that need a checkpoint.

    MobileNetV2 at random init (no download), 32 px, one epoch: about 15 s on two CPU cores.
    """
    tmp_path = tmp_path_factory.mktemp("trained")
    run_cli(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.max_epochs=1",
    )
    return tmp_path / "run"


def run_module(tmp_path: Path, module: str, *arguments: str) -> subprocess.CompletedProcess:
    """Runs `python -m <module> key=value ...` offline, from tmp_path (relative paths land there)."""
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
