"""bench/gpu.py (issue 16's GPU measurements) and bench/elpv_compact.py: the same code path on the CPU, tiny."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, offline_env
from PIL import Image

sys.path.insert(0, str(REPO / "bench"))
import elpv_compact  # noqa: E402
from gpu_bench.cells import DEFAULT_CELLS, TINY_CELLS, parse_cell, summarise_timer  # noqa: E402
from gpu_bench.report import headline  # noqa: E402
from gpu_bench.timer import HostProfiler, StepTimer  # noqa: E402


def test_cells_parse_into_train_overrides():
    cell = parse_cell("r50:all:device:128:compile:w4")
    assert cell.model == "resnet50" and cell.batch == 128 and not cell.experiment
    assert cell.overrides() == [
        "model=resnet50",
        "unfreeze=all",
        "data.batch_size=128",
        "data.augment=basic",
        "data.cache_images=true",
        "data.augment_on=device",
        "model.compile=true",
        "data.num_workers=4",
    ]
    assert parse_cell("mobilenet_v2:all:device:32:nometrics").experiment
    for bad in (
        "mobilenet_v2:all:device",
        "vgg:all:device:32",
        "mobilenet_v2:all:disk:32",
        "mobilenet_v2:all:device:32:turbo",
    ):
        with pytest.raises(SystemExit):
            parse_cell(bad)
    for spec in DEFAULT_CELLS + TINY_CELLS:
        if spec != "study":
            parse_cell(spec)


def test_timer_summary_and_headline():
    timer = {
        "epochs": [
            {
                "epoch": 0,
                "images": 100,
                "wait_s": 1.0,
                "step_s": 1.0,
                "steps": 4,
                "host_wait_s": 0.5,
                "host_step_s": 1.5,
            },
            {
                "epoch": 1,
                "images": 100,
                "wait_s": 0.1,
                "step_s": 0.9,
                "steps": 4,
                "host_wait_s": 0.2,
                "host_step_s": 0.8,
            },
        ],
        "validation_s": [0.5, 0.5],
        "sanity_s": 0.1,
        "callback_fit_s": 5.0,
        "syncs": {"count": 3, "places": {}},
        "host": {"train/fetch": 0.6, "train/checkpoint": 0.4},
    }
    summary = summarise_timer(timer, batch=25)
    assert summary["data_wait"] == pytest.approx(1.1 / 3.0)
    assert summary["steady_data_wait"] == pytest.approx(0.1)
    assert summary["steady_images_per_s"] == pytest.approx(100.0)
    assert summary["other_in_fit_s"] == pytest.approx(5.0 - 3.0 - 1.0 - 0.1)
    assert summary["host_loader_wait"] == pytest.approx(0.6 / 3.0)
    assert summary["checkpoint_s"] == pytest.approx(0.4)
    rows = [
        {
            "cell": "a",
            "model": "mobilenet_v2",
            "unfreeze": "all",
            "experiment": False,
            "images_per_s": 1000.0,
            "data_wait": 0.5,
        },
        {"cell": "b", "model": "mobilenet_v2", "unfreeze": "all", "experiment": True, "images_per_s": 9900.0},
        {
            "cell": "c",
            "model": "mobilenet_v2",
            "unfreeze": "all",
            "experiment": False,
            "images_per_s": 2000.0,
            "data_wait": 0.25,
        },
        {"cell": "study"},
    ]
    line, best = headline(rows, "cuda")
    assert best["cell"] == "c"
    assert line == "gpu mobilenet_v2 unfreeze=all images_per_second 2000 data_wait 0.250"


def test_compact_copy_keeps_the_layout(image_folder, tmp_path):
    count, size = elpv_compact.compact_copy(image_folder, tmp_path / "copy", quality=92)
    sources = sorted(p.relative_to(image_folder).with_suffix(".jpg") for p in image_folder.glob("*/*.png"))
    assert sorted(p.relative_to(tmp_path / "copy") for p in (tmp_path / "copy").glob("*/*.jpg")) == sources
    assert count == len(sources) and size > 0
    with Image.open(tmp_path / "copy" / sources[0]) as image:
        assert image.format == "JPEG" and image.mode == "L"


@pytest.mark.slow
def test_cpu_dry_run(image_folder, tmp_path):
    """One cell and a one-run study through train.py on the CPU: the table, the last line and the files in --out."""
    out = tmp_path / "out"
    env = offline_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu.py"),
            "--device",
            "cpu",
            "--tiny",
            "--data-root",
            str(image_folder),
            "--cells",
            "mobilenet_v2:all:device:8,study",
            "--study-depths",
            "0",
            "--study-seeds",
            "0",
            "--image-size",
            "32",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"cpu mobilenet_v2 unfreeze=all images_per_second [\d.]+ data_wait 0\.\d{3}", lines[-1]), (
        result.stdout
    )
    assert any(line.startswith("| mobilenet_v2 | all | device | 8 |") for line in lines)
    assert any(line.startswith("depth study (-m unfreeze=0 seed=0, 1 epochs): done; 1 of 1 runs") for line in lines), (
        result.stdout + result.stderr[-3000:]
    )
    assert (out / "gpu_results.md").read_text().strip().splitlines()[-1] == lines[-1]
    rows = json.loads((out / "gpu_results.json").read_text())["rows"]
    cell = rows[0]
    assert cell["status"] == "done" and cell["images_per_s"] > 0 and 0 <= cell["data_wait"] < 1
    assert cell["train_s"] > 0 and cell["validation_s"] > 0 and cell["checkpoint_s"] > 0
    assert 0 < cell["host_loader_wait"] < 1
    assert (out / "gpu_logs.tar.gz").stat().st_size > 0


class FakeEvent:
    """torch.cuda.Event on a clock the test sets: record() reads it, elapsed_time() is in milliseconds."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.time = None

    def record(self) -> None:
        self.time = FakeEvent.clock

    def elapsed_time(self, end: FakeEvent) -> float:
        return 1000 * (end.time - self.time)


def test_step_timer_cuda_path(monkeypatch, tmp_path):
    """The CUDA branch of StepTimer (events, the sync count, peak memory) driven hook by hook on a fake clock."""
    import types
    import warnings

    import torch

    modes = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    timer = StepTimer(str(tmp_path / "timer.json"))
    trainer = types.SimpleNamespace(current_epoch=0, max_epochs=2, sanity_checking=False, profiler=HostProfiler())
    module = types.SimpleNamespace(device=torch.device("cuda"))
    batch = (None, [0] * 8)
    timer.on_fit_start(trainer, module)
    for epoch in range(2):
        trainer.current_epoch = epoch
        FakeEvent.clock = 10.0 * epoch
        timer.on_train_epoch_start(trainer, module)
        for index in range(3):
            FakeEvent.clock += 0.25  # the wait for the batch
            timer.on_train_batch_start(trainer, module, batch, index)
            if epoch == 1 and index == 2:
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            FakeEvent.clock += 0.75  # the step
            timer.on_train_batch_end(trainer, module, None, batch, index)
        timer.on_validation_start(trainer, module)
        timer.on_validation_end(trainer, module)
        timer.on_train_epoch_end(trainer, module)
    timer.on_fit_end(trainer, module)
    result = json.loads((tmp_path / "timer.json").read_text())
    assert [e["wait_s"] for e in result["epochs"]] == pytest.approx([0.75, 0.75])
    assert [e["step_s"] for e in result["epochs"]] == pytest.approx([2.25, 2.25])
    assert [e["images"] for e in result["epochs"]] == [24, 24]
    assert result["syncs"]["count"] == 1 and modes == ["warn", 0]
    assert result["gpu_peak_gib"] == 3 and len(result["validation_s"]) == 2
    summary = summarise_timer(result, batch=8)
    assert summary["data_wait"] == pytest.approx(0.25) and summary["steady_images_per_s"] == pytest.approx(8.0)
