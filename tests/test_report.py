"""`python -m finetune.report`: one table across the runs of a sweep, aggregated seeds, plots, partial sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, offline_env, run_module_in_process, run_multirun
from nbclient import NotebookClient
from omegaconf import OmegaConf

from finetune.report import PLOTS, build_report, main, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(
    job_dir: Path,
    *,
    strategy: str = "transfer",
    unfreeze: int | str = 0,
    seed: int = 0,
    lr: float = 1e-3,
    overrides: tuple[str, ...] = (),
    metrics: dict | None = None,
    curve: tuple[float, ...] = (),
    log: str = "",
) -> Path:
    """A run folder as train.py writes it, without training: config, overrides, and what else is given."""
    hydra = job_dir / ".hydra"
    hydra.mkdir(parents=True)
    config = {  # unresolved, as Hydra stores it
        "seed": seed,
        "unfreeze": "${strategy.unfreeze}",
        "model": {"name": "mobilenet_v2", "source": "torchvision", "weights": None, "unfreeze": "${unfreeze}"},
        "strategy": {"name": strategy, "unfreeze": unfreeze, "lr": lr},
        "data": {"root": "/data", "split_seed": "${seed}"},
        "trainer": {"max_epochs": len(curve) or 3},
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
    }
    OmegaConf.save(OmegaConf.create(config), hydra / "config.yaml")
    OmegaConf.save(
        OmegaConf.create([f"strategy={strategy}", f"seed={seed}", "data.root=/data", *overrides]),
        hydra / "overrides.yaml",
    )
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        write_events(job_dir / "tensorboard", curve)
    if log:
        (job_dir / "train.log").write_text(log)
    return job_dir


def write_events(folder: Path, curve: tuple[float, ...]) -> None:
    """val/acc once per epoch, as Lightning logs it (at the global step), and a second file as trainer.test's."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for epoch, value in enumerate(curve):
            writer.add_scalar("val/acc", value, global_step=5 * (epoch + 1) - 1)
    with SummaryWriter(str(folder), filename_suffix=".test") as writer:
        writer.add_scalar("test/acc", 0.5, global_step=5 * len(curve))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert path.stat().st_size > 10_000, path  # axes, lines and labels, not an empty canvas


def run_report(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.report", *arguments],
        cwd=REPO,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_reports_a_real_sweep_of_transfer_and_finetune(tmp_path, image_folder):
    sweep = tmp_path / "sweep"
    run_multirun(
        tmp_path,
        sweep,
        "strategy=transfer,finetune",
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=8",
        "trainer.max_epochs=2",
    )

    result = run_report(tmp_path, f"sweep_dir={sweep}")
    assert result.returncode == 0, result.stdout + result.stderr

    rows = {row["strategy"]: row for row in read_csv(sweep / "report.csv")}
    assert set(rows) == {"transfer", "finetune"}
    assert rows["transfer"]["unfreeze"] == "0" and rows["finetune"]["unfreeze"] == "2"
    assert {row["status"] for row in rows.values()} == {"done"}
    assert int(rows["transfer"]["trainable_params"]) < int(rows["finetune"]["trainable_params"])
    for row in rows.values():
        assert 0.0 <= float(row["test_acc"]) <= 1.0 and row["best_epoch"] in ("0", "1")
    assert "| finetune" in result.stdout and "| transfer" in result.stdout  # the table is printed
    for name in PLOTS:
        assert_png(sweep / name)
    assert (sweep / "report.md").read_text().count("| done ") == 2
    assert len(read_csv(sweep / "report_by_point.csv")) == 2
    # Each job in its own directory, all on the same split.
    assert (sweep / "0" / "split.csv").read_text() == (sweep / "1" / "split.csv").read_text()


def test_partial_sweep_lists_failed_and_incomplete_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / "multirun.yaml").parent.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_run(sweep / "0", metrics={"val/acc": 0.75, "test/acc": 0.7, "params/trainable": 2562}, curve=(0.5, 0.75))
    make_run(
        sweep / "1",
        strategy="finetune",
        unfreeze=2,
        log="[2026-11-23 10:00:00,000][finetune][ERROR] - error: data.root /data is not a folder\n",
    )
    make_run(sweep / "2", strategy="full", unfreeze="all", curve=(0.4,))  # killed after one epoch

    assert main([f"sweep_dir={sweep}"]) == 0

    rows = {row["job"]: row for row in read_csv(sweep / "report.csv")}
    assert {job: row["status"] for job, row in rows.items()} == {"0": "done", "1": "failed", "2": "incomplete"}
    assert rows["1"]["test_acc"] == "" and rows["2"]["val_acc"] == ""
    assert rows["1"]["error"] == "data.root /data is not a folder"
    assert rows["2"]["unfreeze"] == "all"
    printed = capsys.readouterr().out
    assert "job 1 (mobilenet_v2/finetune/unfreeze=2/seed=0) failed: data.root /data is not a folder" in printed
    assert "job 2 (mobilenet_v2/full/unfreeze=all/seed=0) is incomplete" in printed
    for name in PLOTS:
        assert_png(sweep / name)


def test_seeds_of_one_point_are_aggregated(tmp_path):
    sweep = tmp_path / "sweep"
    runs = [
        ("transfer", 0, (), 0.5),
        ("transfer", 0, (), 0.6),
        ("transfer", 0, (), 0.7),
        ("finetune", 2, (), 0.8),
        ("finetune", 2, (), 0.9),
        ("finetune", 2, ("strategy.lr=0.01",), 0.4),
    ]
    for job, (strategy, unfreeze, overrides, test_acc) in enumerate(runs):
        seed = sum(1 for other in runs[:job] if other[:3] == (strategy, unfreeze, overrides))
        metrics = {
            "val/acc": test_acc + 0.05,
            "test/acc": test_acc,
            "test/f1": test_acc - 0.1,
            "params/trainable": 2562 if strategy == "transfer" else 888_642,
            "best_epoch": 1,
        }
        make_run(
            sweep / str(job),
            strategy=strategy,
            unfreeze=unfreeze,
            seed=seed,
            overrides=overrides,
            lr=0.01 if overrides else 1e-3,
            metrics=metrics,
            curve=(test_acc - 0.2, test_acc + 0.05),
        )

    report = build_report(sweep)

    assert [(row.strategy, row.seed, row.other) for row in report.rows] == [  # shallow to deep
        ("transfer", 0, ""),
        ("transfer", 1, ""),
        ("transfer", 2, ""),
        ("finetune", 0, ""),
        ("finetune", 1, ""),
        ("finetune", 0, "strategy.lr=0.01"),
    ]
    assert report.rows[3].val_acc_curve == pytest.approx([0.6, 0.85])  # both events files read, val/acc only
    transfer, finetune, finetune_lr = report.points
    assert (finetune.n, finetune.seeds, finetune_lr.n, transfer.n, transfer.seeds) == (2, [0, 1], 1, 3, [0, 1, 2])
    assert transfer.mean("test/acc") == pytest.approx(0.6) and transfer.std("test/acc") == pytest.approx(0.1)
    assert finetune.mean("test/acc") == pytest.approx(0.85)
    assert finetune.std("test/acc") == pytest.approx(0.0707107, abs=1e-6)
    assert finetune_lr.std("test/acc") is None and finetune_lr.other == "strategy.lr=0.01"

    write_report(report, sweep)
    by_point = read_csv(sweep / "report_by_point.csv")
    assert [(row["strategy"], row["n"], row["seeds"]) for row in by_point] == [
        ("transfer", "3", "0 1 2"),
        ("finetune", "2", "0 1"),
        ("finetune", "1", "0"),
    ]
    assert float(by_point[0]["test_acc_mean"]) == pytest.approx(0.6)
    assert float(by_point[0]["test_acc_std"]) == pytest.approx(0.1)
    assert by_point[2]["test_acc_std"] == ""
    markdown = (sweep / "report.md").read_text()
    assert "0.6000 ± 0.1000" in markdown and "0.8500 ± 0.0707" in markdown
    for name in PLOTS:
        assert_png(sweep / name)
        assert f"({name})" in markdown


def test_a_single_run_folder_is_a_one_row_report(tmp_path):
    run = make_run(tmp_path / "2026-11-23_10-00-00_run", metrics={"val/acc": 0.9}, curve=(0.8, 0.9))
    written = write_report(build_report(run), run, plots=False)
    rows = read_csv(run / "report.csv")
    assert len(rows) == 1 and rows[0]["job"] == run.name and rows[0]["val_acc"] == "0.9"
    assert not any(path.suffix == ".png" for path in written)


def test_without_argument_reports_the_newest_sweep_under_multirun(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, mtime in (("old", 1_000_000), ("new", 2_000_000)):
        sweep = tmp_path / "multirun" / "2026-11-23" / name
        make_run(sweep / "0", metrics={"val/acc": 0.5})
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
        os.utime(sweep / "multirun.yaml", (mtime, mtime))
    assert main(["plots=false"]) == 0
    assert str(Path("multirun") / "2026-11-23" / "new") in capsys.readouterr().out
    assert (tmp_path / "multirun" / "2026-11-23" / "new" / "report.csv").exists()
    assert not (tmp_path / "multirun" / "2026-11-23" / "old" / "report.csv").exists()


def test_empty_sweep_stops_with_one_line_and_exit_code_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_module_in_process(tmp_path, "finetune.report", f"sweep_dir={empty}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {empty} holds no runs")


@pytest.mark.parametrize("arguments", [["sweep_dir=missing"], []], ids=["missing folder", "no sweep under multirun"])
def test_nothing_to_report_is_a_usage_error(tmp_path, monkeypatch, capsys, arguments):
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1


@pytest.mark.slow
def test_transfer_vs_finetune_notebook_runs_a_tiny_sweep(tmp_path, image_folder, monkeypatch):
    # The notebook's sweep runs in a subprocess of the kernel, which inherits this environment: keep it offline.
    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    sweep = tmp_path / "sweep"
    tiny = [
        "model.weights=null",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=8",
        "trainer.limit_train_batches=2",
    ]
    notebook = nbformat.read(REPO / "notebooks" / "transfer_vs_finetune.ipynb", as_version=4)
    parameters = notebook.cells[1]
    for old, new in (
        ("DATA_ROOT = None", f"DATA_ROOT = {str(image_folder)!r}"),
        ('MODEL = "efficientnet_lite0"', 'MODEL = "mobilenet_v2"'),
        ("EPOCHS = 3", "EPOCHS = 2"),
        ("EXTRA_OVERRIDES = []", f"EXTRA_OVERRIDES = {tiny!r}"),
        ("NEW_SWEEP_DIR = None", f"NEW_SWEEP_DIR = {str(sweep)!r}"),
    ):
        assert old in parameters.source
        parameters.source = parameters.source.replace(old, new)

    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    markdown = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "| transfer" in markdown and "| finetune" in markdown and "| done " in markdown
    assert sum("image/png" in output.get("data", {}) for output in outputs) == len(PLOTS)
    assert {row["status"] for row in read_csv(sweep / "report.csv")} == {"done"}


def test_report_flags_strong_class_imbalance_and_skipped_images(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", metrics={"val/acc": 0.9, "test/acc": 0.9, "data/imbalance": 1.2, "data/skipped_files": 0})
    make_run(
        sweep / "1",
        strategy="finetune",
        unfreeze=2,
        metrics={"val/acc": 0.9, "test/acc": 0.9, "data/imbalance": 6.5, "data/skipped_files": 3},
    )
    text = build_report(sweep).to_markdown()
    assert "Strong class imbalance in 1 run(s): the largest training class has up to 6.5x" in text
    assert "data.balance=sampler" in text
    assert "3 unreadable image(s) were left out of 1 run(s)" in text

    balanced = tmp_path / "balanced"
    make_run(balanced / "0", metrics={"val/acc": 0.9, "test/acc": 0.9, "data/imbalance": 2.9})
    make_run(balanced / "1", metrics={"val/acc": 0.9, "test/acc": 0.9, "data/imbalance": 6.5, "data/balanced": 1.0})
    assert "imbalance" not in build_report(balanced).to_markdown()
