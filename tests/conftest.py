"""Shared fixtures: a small generated image folder, and runners for the real command line (in a subprocess, or
in this process: `run_cli_in_process`)."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (the README's `-n 2`) each worker stands for one core: one intra-op thread, in this process and
# in the CLI runs it starts (they inherit the environment), instead of two workers each spinning a thread per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

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


def run_cli_in_process(
    tmp_path: Path, *overrides: str, check: bool = True, run_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """`run_cli` in this process: train.py's own entry point with these arguments, its output captured.

    For the tests of one-line errors: a subprocess costs about 6 s of imports, this about 0.5 s. What only a real
    process shows (train.py's `sys.exit(main())`, the interpreter printing a traceback) keeps its subprocess tests
    (test_faults.py: test_the_command_line_prints_one_line_and_exit_code_2). An exception that escapes the entry
    point becomes exit code 1 with its traceback in stderr, as the interpreter would print it.
    """
    arguments = [f"hydra.run.dir={run_dir or tmp_path / 'run'}", *overrides, "trainer.enable_progress_bar=false"]
    return _train_in_process(tmp_path, arguments, check)


def run_multirun_in_process(
    tmp_path: Path, sweep_dir: Path, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    """`run_multirun` in this process (see `run_cli_in_process`)."""
    arguments = ["-m", f"hydra.sweep.dir={sweep_dir}", *overrides, "trainer.enable_progress_bar=false"]
    return _train_in_process(tmp_path, arguments, check)


def run_module_in_process(tmp_path: Path, module: str, *arguments: str) -> subprocess.CompletedProcess:
    """`run_module` in this process: the module's `main(arguments)`, what its `__main__` block runs."""
    return _in_process(
        tmp_path, tmp_path, [module, *arguments], lambda: importlib.import_module(module).main(list(arguments))
    )


def run_script_in_process(tmp_path: Path, script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python <script> <arguments>` in this process, from tmp_path, its output captured (see `run_script`)."""
    return _in_process(tmp_path, tmp_path, [str(script), *arguments], lambda: run_script(script, arguments))


def train_py(arguments: Sequence[str]) -> int:
    """Runs train.py as `python train.py <arguments>` does, in this process; returns the exit code.

    Each call executes the file afresh, so each run gets its own feature store (train.py's FEATURES).
    """
    return run_script(REPO / "train.py", arguments)


def run_script(script: Path, arguments: Sequence[str]) -> int:
    """Runs a script as `python <script> <arguments>` does, in this process: as `__main__` (Hydra then finds
    conf/ next to train.py), its folder first on sys.path (bench/common.py); returns the exit code."""
    saved_argv, saved_path = sys.argv, sys.path[:]
    sys.argv = [str(script), *arguments]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:  # sys.exit(main()), Hydra's --help
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)  # sys.exit("message"), as the interpreter prints it
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


def _train_in_process(tmp_path: Path, arguments: list[str], check: bool) -> subprocess.CompletedProcess:
    result = _in_process(tmp_path, REPO, ["train.py", *arguments], lambda: train_py(arguments))
    if check and result.returncode != 0:
        raise AssertionError(f"exit code {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _in_process(tmp_path: Path, cwd: Path, command: list[str], call) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with _process_state_restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.environ.update(offline_env(tmp_path))
        os.chdir(cwd)
        try:
            code = call()
        except Exception:  # what the interpreter would print before exiting with 1
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Puts back what a run changes for the whole process, so that the next test starts as a fresh process would:
    the environment (Lightning's PL_GLOBAL_SEED, our HYDRA_FULL_ERROR), the working folder, logging (Hydra's job
    logging replaces the root handlers and opens <run>/train.log), Hydra's singletons, torch's global flags and
    the signal handlers."""
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    environment, cwd = dict(os.environ), os.getcwd()
    logging_state = {
        logger: (logger.handlers[:], logger.level, logger.propagate, logger.disabled) for logger in _loggers()
    }
    handlers = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    torch_state = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environment)
        for logger in _loggers():
            kept, level, propagate, disabled = logging_state.get(logger, ([], logging.NOTSET, True, False))
            for handler in logger.handlers[:]:
                if handler not in kept:
                    logger.removeHandler(handler)
                    handler.close()
            logger.handlers[:] = kept
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        for number, handler in handlers.items():
            signal.signal(number, handler)
        threads, deterministic, warn_only, benchmark = torch_state
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


def _loggers() -> list[logging.Logger]:
    return [
        logging.getLogger(),
        *(v for v in list(logging.root.manager.loggerDict.values()) if isinstance(v, logging.Logger)),
    ]


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
