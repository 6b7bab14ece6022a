"""Tests for finetune.data.demo: materialising the ELPV demo data set as an ImageFolder tree."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import elpv_dataset  # a dependency: missing, these tests fail (they used to skip, hiding a broken install)
import numpy as np
import pytest
from conftest import run_cli_in_process

from finetune.data import demo, partial_folders
from finetune.data.demo import DEMO_NAMES, README_NAME, default_cache_dir, demo_root
from finetune.errors import UsageError

ELPV_COUNTS = {"functional": 1803, "defective": 821}
ELPV4_COUNTS = {"p000": 1508, "p033": 295, "p067": 106, "p100": 715}
TOTAL = 2624
MARKER = demo._MARKER_NAME


def _labels_csv() -> Path:
    return Path(elpv_dataset.__file__).parent / "data" / "labels.csv"


def _upstream_labels() -> np.ndarray:
    # The exact call elpv_dataset.utils.load_dataset makes, minus the images.
    return np.genfromtxt(_labels_csv(), dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])


def _class_counts(root: Path) -> dict[str, int]:
    return {d.name: sum(1 for _ in d.iterdir()) for d in root.iterdir() if d.is_dir()}


def _fast_fake_copy(src: Path, dst: Path) -> None:
    # Stand-in for the real copy in tests of the bookkeeping around it.
    dst.write_bytes(b"")


def _leftovers(cache: Path) -> list[str]:
    datasets = cache / "datasets"
    if not datasets.exists():
        return []
    return sorted(p.name for p in datasets.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune-cache")


@pytest.fixture(scope="module")
def elpv_root(cache) -> Path:
    return demo_root("elpv", cache_dir=cache)


@pytest.fixture(scope="module")
def elpv4_root(cache) -> Path:
    return demo_root("elpv4", cache_dir=cache)


# --------------------------------------------------------------------------- #
# The labels and the materialised trees
# --------------------------------------------------------------------------- #


def test_labels_parse_like_upstream() -> None:
    ours = demo._read_labels(_labels_csv())
    upstream = _upstream_labels()
    assert len(ours) == len(upstream) == TOTAL
    assert [lb.path for lb in ours] == np.char.decode(upstream["path"]).tolist()
    assert [lb.probability for lb in ours] == upstream["probability"].tolist()
    assert [lb.module_type for lb in ours] == np.char.decode(upstream["type"]).tolist()


def test_expected_counts_match_labels_csv() -> None:
    probabilities = _upstream_labels()["probability"]
    assert int((probabilities < 0.5).sum()) == ELPV_COUNTS["functional"]
    assert int((probabilities >= 0.5).sum()) == ELPV_COUNTS["defective"]
    levels = Counter(int(round(p * 3)) for p in probabilities)
    assert [levels[i] for i in range(4)] == list(ELPV4_COUNTS.values())


def test_elpv_class_counts(elpv_root, cache) -> None:
    assert elpv_root == cache / "datasets" / "elpv"
    assert _class_counts(elpv_root) == ELPV_COUNTS
    assert sum(_class_counts(elpv_root).values()) == TOTAL


def test_elpv4_class_counts(elpv4_root, cache) -> None:
    assert elpv4_root == cache / "datasets" / "elpv4"
    assert _class_counts(elpv4_root) == ELPV4_COUNTS
    assert sum(_class_counts(elpv4_root).values()) == TOTAL


def test_every_image_is_in_its_class(elpv_root, elpv4_root) -> None:
    for label in demo._read_labels(_labels_csv()):
        name = Path(label.path).name
        binary = "defective" if label.probability >= 0.5 else "functional"
        four = {0: "p000", 1: "p033", 2: "p067", 3: "p100"}[round(label.probability * 3)]
        assert (elpv_root / binary / name).is_file()
        assert (elpv4_root / four / name).is_file()


def test_files_are_independent_copies(elpv_root) -> None:
    source = _labels_csv().parent / "images" / "cell0001.png"
    copied = elpv_root / "defective" / "cell0001.png"  # probability 1.0
    assert not copied.is_symlink()
    assert copied.read_bytes() == source.read_bytes()
    assert copied.stat().st_ino != source.stat().st_ino or copied.stat().st_dev != source.stat().st_dev


def test_marker_and_readme(elpv_root, elpv4_root) -> None:
    record = json.loads((elpv4_root / MARKER).read_text())
    assert record["classes"] == ELPV4_COUNTS and record["total"] == TOTAL
    assert json.loads((elpv_root / MARKER).read_text())["classes"] == ELPV_COUNTS

    readme = (elpv_root / README_NAME).read_text()
    for needle in (
        "CC BY-NC-SA 4.0",
        "https://github.com/zae-bayern/elpv-dataset",
        "Buerhop-Lutz",
        "Deitsch",
        "2018",
        "2019",
    ):
        assert needle in readme
    assert "non-commercial" in readme.lower()


def test_only_class_folders_are_directories(elpv_root) -> None:
    assert sorted(p.name for p in elpv_root.iterdir() if p.is_dir()) == ["defective", "functional"]


def test_torchvision_imagefolder_reads_it(elpv_root) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    from finetune.data.images import load_rgb

    folder = datasets.ImageFolder(elpv_root, loader=load_rgb)
    assert folder.classes == ["defective", "functional"]
    assert len(folder) == TOTAL
    image, target = folder[0]
    assert image.mode == "RGB" and image.size == (300, 300)
    assert folder.classes[target] == "defective"


def test_logs_one_info_line(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(demo, "_copy_file", _fast_fake_copy)
    with caplog.at_level("INFO", logger="finetune.data.demo"):
        root = demo_root("elpv", cache_dir=tmp_path)
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(infos) == 1
    message = infos[0].getMessage()
    assert str(root) in message and "CC BY-NC-SA 4.0" in message and "elpv" in message


# --------------------------------------------------------------------------- #
# Second calls: fast, no copying, no package needed
# --------------------------------------------------------------------------- #


def test_second_call_does_not_copy(elpv_root, cache, monkeypatch) -> None:
    marker_mtime = (elpv_root / MARKER).stat().st_mtime_ns

    def refuse(src, dst):
        raise AssertionError("second call must not copy")

    monkeypatch.setattr(demo, "_copy_file", refuse)
    assert demo_root("elpv", cache_dir=cache) == elpv_root
    assert demo_root("elpv", cache_dir=str(cache)) == elpv_root
    assert (elpv_root / MARKER).stat().st_mtime_ns == marker_mtime


def test_second_call_works_after_package_uninstall(elpv_root, cache, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # makes `import` fail
    assert demo_root("elpv", cache_dir=cache) == elpv_root


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_unknown_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="elpv, elpv4"):
        demo_root("mnist", cache_dir=tmp_path)
    assert not (tmp_path / "datasets").exists()
    assert DEMO_NAMES == ("elpv", "elpv4")


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    with pytest.raises(UsageError, match="pip install elpv-dataset"):
        demo_root("elpv", cache_dir=tmp_path)
    assert not (tmp_path / "datasets" / "elpv").exists()


def test_missing_package_stops_the_cli_with_one_line(tmp_path, monkeypatch) -> None:
    # A module of that name that fails to import, first on the path: as if the package were not installed.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "elpv_dataset.py").write_text("raise ImportError('No module named elpv_dataset')\n")
    monkeypatch.syspath_prepend(str(blocker))
    monkeypatch.delitem(sys.modules, "elpv_dataset")  # imported at the top of this file: imported afresh
    result = run_cli_in_process(tmp_path, "data=elpv", "model.weights=null", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-2000:]
    assert "pip install elpv-dataset" in output


def test_foreign_non_empty_folder_is_not_overwritten(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "_copy_file", _fast_fake_copy)
    root = tmp_path / "datasets" / "elpv"
    root.mkdir(parents=True)
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="delete it"):
        demo_root("elpv", cache_dir=tmp_path)
    assert (root / "mine.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_empty_existing_folder_is_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "_copy_file", _fast_fake_copy)
    (tmp_path / "datasets" / "elpv").mkdir(parents=True)
    root = demo_root("elpv", cache_dir=tmp_path)
    assert _class_counts(root) == ELPV_COUNTS


def test_elpv4_rejects_unexpected_probability() -> None:
    assert [demo._classify_elpv4(p) for p in (0.0, 1 / 3, 2 / 3, 1.0)] == list(ELPV4_COUNTS)
    with pytest.raises(ValueError, match="0.5"):
        demo._classify_elpv4(0.5)


def test_read_labels_skips_comments_and_blank_lines(tmp_path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("# header\n\nimages/a.png  0.0  mono\nimages/b.png\t1.0 poly  # note\n")
    parsed = demo._read_labels(labels)
    assert [(lb.path, lb.probability, lb.module_type) for lb in parsed] == [
        ("images/a.png", 0.0, "mono"),
        ("images/b.png", 1.0, "poly"),
    ]
    labels.write_text("images/a.png 0.0\n")
    with pytest.raises(ValueError, match="3 columns"):
        demo._read_labels(labels)


# --------------------------------------------------------------------------- #
# Atomicity and concurrency
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, error) -> None:
    real_copy = demo._copy_file
    calls = 0

    def failing_copy(src, dst):
        nonlocal calls
        calls += 1
        if calls > 100:
            raise error
        real_copy(src, dst)

    monkeypatch.setattr(demo, "_copy_file", failing_copy)
    with pytest.raises(type(error)):
        demo_root("elpv", cache_dir=tmp_path)
    assert calls == 101
    assert not (tmp_path / "datasets" / "elpv").exists()
    assert _leftovers(tmp_path) == []


def test_retry_after_interrupted_build_succeeds(tmp_path, monkeypatch) -> None:
    def failing_copy(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(demo, "_copy_file", failing_copy)
    with pytest.raises(OSError, match="simulated crash"):
        demo_root("elpv4", cache_dir=tmp_path)
    monkeypatch.undo()

    root = demo_root("elpv4", cache_dir=tmp_path)
    assert _class_counts(root) == ELPV4_COUNTS
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(partial_folders.fcntl is None, reason="needs flock to tell live builds from dead ones")
def test_abandoned_partial_is_reclaimed_but_live_one_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "_copy_file", _fast_fake_copy)
    datasets = tmp_path / "datasets"
    dead = datasets / f".elpv{partial_folders.PARTIAL_SUFFIX}dead"
    live = datasets / f".elpv4{partial_folders.PARTIAL_SUFFIX}live"
    for folder in (dead, live):
        (folder / "functional").mkdir(parents=True)
        (folder / "functional" / "x.png").write_bytes(b"")
    lock_fd = partial_folders.try_lock(live)  # stands in for a build still running
    assert lock_fd is not None
    try:
        demo_root("elpv", cache_dir=tmp_path)
        assert not dead.exists()
        assert live.exists()
    finally:
        os.close(lock_fd)


def test_losing_a_race_discards_own_copy(tmp_path, monkeypatch) -> None:
    root = tmp_path / "datasets" / "elpv"

    def copy_while_other_process_finishes(src, dst):
        if not root.exists():
            # Another process completes its own copy while we are busy.
            (root / "functional").mkdir(parents=True)
            (root / "winner.txt").write_text("other process")
            (root / MARKER).write_text("{}")
        dst.write_bytes(b"")

    monkeypatch.setattr(demo, "_copy_file", copy_while_other_process_finishes)
    assert demo_root("elpv", cache_dir=tmp_path) == root
    assert (root / "winner.txt").read_text() == "other process"
    assert _leftovers(tmp_path) == []


def test_concurrent_processes(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = [pool.submit(demo_root, "elpv4", str(tmp_path)) for _ in range(2)]
        roots = {f.result(timeout=120) for f in futures}
    assert roots == {tmp_path / "datasets" / "elpv4"}
    root = roots.pop()
    assert _class_counts(root) == ELPV4_COUNTS
    assert json.loads((root / MARKER).read_text())["total"] == TOTAL
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- #
# Cache location
# --------------------------------------------------------------------------- #


def test_default_cache_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FINETUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "finetune"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "finetune"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "finetune"

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_demo_root_uses_default_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "_copy_file", _fast_fake_copy)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "env-cache"))
    assert demo_root() == tmp_path / "env-cache" / "datasets" / "elpv"
    assert (tmp_path / "env-cache" / "datasets" / "elpv" / MARKER).is_file()
