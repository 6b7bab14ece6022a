"""Bad input and faults, through the real command line: messy folders, configuration mistakes, interruptions.

Most cases run train.py's entry point in this process (conftest.run_cli_in_process: a one-line error in about 0.5 s
instead of a 6 s subprocess). The real `python train.py` runs where only a process shows it: its wiring
(test_a_configuration_mistake_stops_the_real_command_with_one_line, test_hydra_full_error_shows_the_traceback)
and the interruptions (signals, kill -9, Ctrl-C).
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    REPO,
    RESUME,
    draw,
    make_image_folder,
    offline_env,
    run_cli,
    run_cli_in_process,
    run_multirun_in_process,
)
from conftest import TINY as TINY_RUN
from PIL import Image

TINY = (*TINY_RUN, "trainer.max_epochs=1")


def make_messy_folder(root):
    """Three learnable classes plus every kind of file a real field folder holds; returns the unreadable ones."""
    make_image_folder(root, per_class=10)
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    circle, square, stripes = root / "circle", root / "square", root / "stripes"

    (circle / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (square / "Thumbs.db").write_bytes(bytes(range(256)))
    (stripes / "._stripes_000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (stripes / "README.txt").write_text("field notes")

    buffer = io.BytesIO()
    photo.resize((400, 300)).save(buffer, "JPEG", quality=95)
    (circle / "truncated_upload.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (square / "empty.png").write_bytes(b"")
    (stripes / "notes.jpg").write_text("not a picture, despite the name")

    photo.convert("CMYK").save(circle / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(square / "deep_16bit.png")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(stripes / "palette_transparent.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a portrait phone photo
    photo.save(circle / "phone_photo.jpg", exif=exif)
    photo.resize((2400, 1800)).save(square / "huge_scan.tif")
    photo.resize((4, 4)).save(stripes / "tiny_icon.bmp")
    photo.save(circle / "ñandú_日本.png")
    photo.save(square / "UPPER_CASE.JPG")
    photo.save(stripes / "modern.webp")
    return {
        circle / "truncated_upload.jpg": "truncated",
        square / "empty.png": "empty file",
        stripes / "notes.jpg": "not an image",
    }


def snapshot(root):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_a_messy_folder_trains_to_the_end_and_names_exactly_its_bad_files(tmp_path):
    data = tmp_path / "field photos"
    bad = make_messy_folder(data)
    before = snapshot(data)

    result = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", "trainer.limit_train_batches=2")
    output = result.stdout + result.stderr
    run = tmp_path / "run"

    assert json.loads((run / "metrics.json").read_text())["data/skipped_files"] == 3
    listed = dict(line.split("\t") for line in (run / "skipped_files.txt").read_text().splitlines())
    assert set(listed) == {str(path) for path in bad}
    for path, reason in bad.items():
        assert reason in listed[str(path)]
        assert output.count(f"skipping {path}") == 1  # named once in the log
    # Every readable image of every kind is used; hidden and non-image files are ignored, not reported.
    with open(run / "split.csv", encoding="utf-8") as file:
        used = file.read()
    assert used.count("\n") - 1 == 30 + 9
    assert "ñandú_日本.png" in used and "UPPER_CASE.JPG" in used and "modern.webp" in used
    assert "Thumbs.db" not in used and "._stripes_000" not in used and "README" not in used
    assert snapshot(data) == before  # the data folder is read-only to us

    # The second run over the same folder reuses the scan (cached by size and mtime) and skips the same files.
    again = tmp_path / "again"
    rerun = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", "trainer.limit_train_batches=1", run_dir=again)
    assert "data scan: 42 image(s), 0 decoded now, 42 known from an earlier scan" in rerun.stdout + rerun.stderr
    assert (again / "skipped_files.txt").read_text() == (run / "skipped_files.txt").read_text()


def test_strict_mode_stops_at_the_first_bad_file(tmp_path):
    data = tmp_path / "data"
    bad = make_messy_folder(data)
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", "data.strict=true", check=False)
    line = assert_one_line_error(result, "3 unreadable image(s)", "leave out data.strict=true")
    assert any(str(path) in line for path in bad)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one error line, which holds every expected text; returns it."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "error: " in line]
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write_class(root, name, count, seed=0):
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        draw(CLASSES[seed % 3], rng).save(root / name / f"{name}_{index:03d}.png")


@pytest.mark.parametrize(
    "case", ["missing root", "one class", "class of unreadable files", "class too small", "empty class in val folder"]
)
def test_data_that_cannot_train_stops_with_one_line(tmp_path, case):
    data = tmp_path / "data"
    if case == "missing root":
        expected = (f"data.root {data} is not a folder",)
    elif case == "one class":
        write_class(data, "cats", 5)
        expected = ("holds 1 class folder(s)", "at least two")
    elif case == "class of unreadable files":
        write_class(data, "cats", 5)
        (data / "dogs").mkdir()
        (data / "dogs" / "a.jpg").write_text("text")
        (data / "dogs" / "b.png").write_bytes(b"")
        expected = (f"class folder {data / 'dogs'} holds no usable images (2 unreadable)",)
    elif case == "class too small":
        write_class(data, "cats", 5)
        write_class(data, "dogs", 2)
        expected = ("class 'dogs' has 2 image(s): too few to split", "change data.split")
    else:
        for split in ("train", "val"):
            write_class(data / split, "cats", 3)
            write_class(data / split, "dogs", 3)
        for file in (data / "val" / "dogs").iterdir():
            file.unlink()
        expected = (f"class folder {data / 'val' / 'dogs'} holds no images",)
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", check=False)
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=mobilenet_v9", ("unknown model=mobilenet_v9 (did you mean mobilenet_v2", "choose one of")),
        ("model.name=resnet1888", ("unknown torchvision model 'resnet1888' (did you mean resnet18",)),
        ("data.batch_sizee=4", ("unknown key data.batch_sizee (did you mean data.batch_size?)",)),
        (
            "paths.outptu_dir=x",
            ("unknown key paths.outptu_dir (did you mean paths.output_dir?)", "+paths.outptu_dir=x"),
        ),
        ("data.batch_size=abc", ("data.batch_size='abc' is not a whole number", "data.batch_size=32")),
        ("trainer.max_epochs=2.5", ("trainer.max_epochs=2.5 is not a whole number or null",)),
        ("strategy.lr=fast", ("strategy.lr='fast' is not a number; e.g. strategy.lr=0.5",)),
        ("seed=abc", ("seed='abc' is not a whole number",)),
        ("unfreeze=two", ("unfreeze='two' is not accepted: use 0 (head only)",)),
        ("unfreeze=30", ("unfreeze=30 is out of range: mobilenet_v2 has 19 blocks",)),
        ("data.split=[0.7,0.2", ("cannot read the override 'data.split=[0.7,0.2'",)),
        ("data.balance=oversample", ("data.balance=oversample: choose sampler, loss_weights or null",)),
    ],
)
def test_configuration_mistakes_stop_with_one_line(tmp_path, image_folder, override, expected):
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", override, check=False)
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "run" / "metrics.json").exists()
    if override.startswith("data."):  # a structured section: no advice to append a key its constructor refuses
        assert "to append" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_configuration_mistake_stops_the_real_command_with_one_line(tmp_path, image_folder):
    # What the in-process cases above cannot show: train.py's own wiring (sys.exit with main's code) and that the
    # interpreter prints no traceback. A mistake found while composing; one found inside the run is
    # test_cli.py's failed download.
    result = run_cli(tmp_path, *TINY, f"data.root={image_folder}", "data.batch_size=abc", check=False)
    assert_one_line_error(result, "data.batch_size='abc' is not a whole number", "data.batch_size=32")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path, image_folder):
    env = offline_env(tmp_path) | {"HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "data.batch_size=abc"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The type error is Hydra's now (the structured config, while composing): its traceback, not the one line.
    assert result.returncode != 0 and "Traceback" in result.stderr and "data.batch_size=abc" in result.stderr
    assert not result.stderr.strip().startswith("error:")


@pytest.mark.slow
def test_a_run_never_overwrites_an_earlier_one(tmp_path, image_folder):
    run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", "trainer.limit_train_batches=1")
    run = tmp_path / "run"
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", "seed=7", check=False)
    assert_one_line_error(result, f"hydra.run.dir={run} already holds a run", "ckpt_path=last")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


RESUMABLE = (
    *RESUME,
    "trainer.max_epochs=3",
    "callbacks.step_checkpoint.every_n_train_steps=3",
)


def fault(step: int, **kind: str) -> list[str]:
    return [
        "+callbacks.fault._target_=faults.FaultAtStep",
        f"+callbacks.fault.step={step}",
        *(f"+callbacks.fault.{key}={value}" for key, value in kind.items()),
    ]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, image_folder) -> Path:
    """The uninterrupted run that the SIGTERM and kill -9 tests compare their resumed runs with (the same
    command for both: computed once)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    result = run_cli(tmp_path, *RESUMABLE, f"data.root={image_folder}")
    assert "not resumable" not in result.stderr  # Lightning sees the loader's place travel in checkpoints
    return tmp_path / "run"


def assert_same_training(straight, resumed):
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (straight, resumed)]
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "epochs"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-6), key
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for run in (straight, resumed)
    ]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6) for k in weights[0])


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_resumed_run_ends_like_an_uninterrupted_one(
    tmp_path, image_folder, straight_run
):
    # 27 training images in batches of 8: 4 steps per epoch; the signal arrives in the middle of the 2nd epoch.
    data = f"data.root={image_folder}"
    stopped = run_cli(tmp_path / "stopped", *RESUMABLE, data, *fault(6, signal="SIGTERM"), check=False)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    run = tmp_path / "stopped" / "run"
    assert f"SIGTERM: training state saved in {run / 'checkpoints' / 'last.ckpt'}" in output
    assert "resume with: python train.py" in output and "ckpt_path=last" in output
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # Stopped after the batch in progress (6 or 7, as the fault runs before or after the saving callback).
    assert saved["global_step"] in (6, 7) and saved["epoch"] == 1
    assert not (run / "metrics.json").exists()

    run_cli(tmp_path / "stopped", *RESUMABLE, data, "ckpt_path=last")
    assert_same_training(straight_run, run)


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_last_step_checkpoint(tmp_path, image_folder, straight_run):
    data = f"data.root={image_folder}"
    killed = run_cli(tmp_path / "killed", *RESUMABLE, data, *fault(8, signal="SIGKILL"), check=False)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "killed" / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    run_cli(tmp_path / "killed", *RESUMABLE, data, "ckpt_path=last")
    assert_same_training(straight_run, run)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tmp_path, image_folder):
    env = offline_env(tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            f"hydra.run.dir={tmp_path / 'run'}",
            *RESUMABLE,
            f"data.root={image_folder}",
            "trainer.max_epochs=50",
            "trainer.enable_progress_bar=false",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell starts background commands with SIGINT ignored, and children inherit that (a test run started
        # with `&` then fails here): Ctrl-C reaches the run as it reaches a terminal's foreground process.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert "Ctrl-C: training state saved in" in output
    saved = torch.load(checkpoint, weights_only=True)
    assert 0 < saved["global_step"] < 50 * 4
    # Two epochs past where it stopped (a fixed max_epochs raced the signal: past it, resuming is refused).
    resumed = run_cli(
        tmp_path,
        *RESUMABLE,
        f"data.root={image_folder}",
        f"trainer.max_epochs={saved['epoch'] + 2}",
        "ckpt_path=last",
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").exists()


def test_resuming_past_max_epochs_says_how_to_go_on(tmp_path, image_folder):
    # Lightning refuses a checkpoint whose epoch is past max_epochs with a traceback; we say how to go on.
    run_cli_in_process(tmp_path, *TINY_RUN, f"data.root={image_folder}", "trainer.max_epochs=3")
    result = run_cli_in_process(
        tmp_path, *TINY_RUN, f"data.root={image_folder}", "trainer.max_epochs=1", "ckpt_path=last", check=False
    )
    assert_one_line_error(
        result, "was saved at epoch 2 (counted from 0), past trainer.max_epochs=1: resume with a larger trainer.max_"
    )


@pytest.mark.slow
def test_out_of_memory_names_the_settings_to_lower(tmp_path, image_folder):
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", *fault(1, error="oom"), check=False)
    assert_one_line_error(
        result,
        "out of GPU memory with data.batch_size=8, data.image_size=32, unfreeze=",
        "lower data.batch_size first",
        "trainer.precision=bf16-mixed",
    )


@pytest.mark.slow
def test_class_imbalance_is_reported_and_balanced_on_request(tmp_path):
    data = tmp_path / "data"
    write_class(data, "common", 24)
    write_class(data, "rare", 6, seed=1)
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={data}", "data.balance=null")
    output = result.stdout + result.stderr
    assert "classes: common 24, rare 6" in output
    assert "strong class imbalance" in output and "data.balance=sampler" in output
    # 0.7 of each class trains (17 and 4): the ratio the log and metrics.json report.
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data/imbalance"] == pytest.approx(17 / 4)

    # data.balance=loss_weights: the default
    weighted = run_cli_in_process(tmp_path / "weighted", *TINY, f"data.root={data}")
    assert "strong class imbalance" not in weighted.stdout + weighted.stderr
    hyperparameters = torch.load(tmp_path / "weighted" / "run" / "checkpoints" / "last.ckpt", weights_only=True)[
        "hyper_parameters"
    ]
    # total / (classes * count)
    assert hyperparameters["class_weights"] == pytest.approx([21 / (2 * 17), 21 / (2 * 4)])


def test_balanced_sampler_draws_every_class_equally_often():
    from finetune.data.samplers import EpochShuffler

    labels = [0] * 90 + [1] * 10
    weights = [1 / 90 if label == 0 else 1 / 10 for label in labels]
    sampler = EpochShuffler(len(labels), seed=3, weights=weights)
    drawn = [labels[index] for epoch in range(20) for index in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert len(drawn) == 20 * 100
    assert 0.45 < sum(drawn) / len(drawn) < 0.55
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler)  # a function of (seed, epoch)


def test_a_resumed_sampler_serves_the_rest_of_its_epoch():
    from finetune.data.samplers import EpochShuffler

    sampler = EpochShuffler(10, seed=0, keyed=True)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume_at(2, 6)
    sampler.set_epoch(2)  # Lightning sets the same epoch again before iterating: the place is kept
    assert list(sampler) == whole[6:] and len(sampler) == 10
    assert list(sampler) == whole  # only the first iteration after a resume is shortened


def test_the_scan_gives_the_same_verdicts_in_parallel_and_remembers_them(tmp_path):
    from finetune.data.scan import unreadable_images

    rng = np.random.default_rng(0)
    paths = []
    for index in range(300):
        path = tmp_path / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "007.png").write_bytes(b"")
    (tmp_path / "123.png").write_text("text")
    expected = {paths[7]: "empty file (0 bytes)", paths[123]: "not an image (unknown format or damaged header)"}

    assert unreadable_images(paths, None, threads=1) == expected
    cache = tmp_path / "cache" / "scan.json"
    assert unreadable_images(paths, cache, threads=2) == expected
    # Remembered by size and modification time: a file that changes is decoded again.
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[7])
    assert unreadable_images(paths, cache, threads=1) == {paths[123]: expected[paths[123]]}


def test_an_image_over_the_decompression_bomb_limit_is_named_as_too_large(tmp_path, monkeypatch):
    from finetune.data.scan import why_unreadable

    Image.new("RGB", (300, 200)).save(tmp_path / "scan.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 60,000 pixels is then more than twice the limit
    assert why_unreadable(str(tmp_path / "scan.png")).startswith("too large to decode safely (over 40,000 pixels")


@pytest.mark.slow
def test_a_sweep_never_overwrites_an_earlier_sweep(tmp_path, image_folder):
    sweep = tmp_path / "sweep"
    data = f"data.root={image_folder}"
    run_multirun_in_process(tmp_path, sweep, *TINY, data, "trainer.limit_train_batches=1", "seed=1")
    before = (sweep / "0" / "metrics.json").read_text()
    again = run_multirun_in_process(tmp_path, sweep, *TINY, data, "seed=2", check=False)
    assert_one_line_error(again, f"hydra.sweep.dir={sweep} already holds a sweep's runs")
    assert (sweep / "0" / "metrics.json").read_text() == before
