"""Leakage-aware splits: groups (a CSV, a sub-folder level, near-duplicates) stay on one side of every split and fold;
near-duplicates across splits are found, listed in the run folder and reported."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest
from conftest import CLASSES, make_image_folder, run_cli, run_cli_in_process
from PIL import Image
from test_faults import TINY, assert_one_line_error
from test_study import FOLD_NOISE, make_fold_run

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.groups import write_duplicates
from finetune.report import build_report


def prepared(root, **options) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(root=str(root), num_workers=0, batch_size=4, **options)
    datamodule.prepare_data()
    return datamodule


def split_of(datamodule) -> dict[str, str]:
    return {path: split for split, samples in datamodule.splits.items() for path, _ in samples}


def plant_copies(root, count: int = 6) -> list[tuple[str, str]]:
    """Resized copies (96 px, JPEG) of the first `count` images of every class, beside them: (original, copy)."""
    planted = []
    for kind in CLASSES:
        for original in sorted((root / kind).glob("*.png"))[:count]:
            copy = original.with_name(f"copy_of_{original.stem}.jpg")
            Image.open(original).resize((96, 96)).save(copy, quality=90)
            planted.append((str(original), str(copy)))
    return planted


def test_a_resized_copy_of_a_training_image_in_the_test_split_is_found_listed_and_warned_about(tmp_path, caplog):
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        make_image_folder(tmp_path / "data" / split, per_class=count, seed=len(split))
    original = tmp_path / "data" / "train" / "square" / "square_004.png"
    copy = tmp_path / "data" / "test" / "square" / "resized.jpg"
    Image.open(original).resize((80, 80)).save(copy, quality=85)

    datamodule = prepared(tmp_path / "data")
    assert [pair[:2] for pair in datamodule.leakage.pairs] == [(str(original), str(copy))]
    with caplog.at_level(logging.INFO, logger="finetune.data.groups"):
        write_duplicates(tmp_path / "duplicates.csv", datamodule.leakage, datamodule.splits, datamodule.root)
    with open(tmp_path / "duplicates.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["path_a"], r["path_b"], r["split_a"], r["split_b"]) for r in rows] == [
        ("train/square/square_004.png", "test/square/resized.jpg", "train", "test")
    ]
    assert int(rows[0]["distance"]) <= 6
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1 near-duplicate image pair(s) cross splits (of 1 found)")

    assert prepared(tmp_path / "data", duplicates="ignore").leakage.pairs == []  # ignore: no hashing


@pytest.mark.parametrize("folds", [None, 3])
def test_with_duplicates_group_no_pair_spans_two_splits_or_folds(tmp_path, folds):
    root = make_image_folder(tmp_path / "data", per_class=20)
    planted = plant_copies(root)
    # The control: the same folder split without grouping leaves pairs across splits.
    plain = split_of(prepared(root, split_seed=1, folds=folds))
    assert any(plain[a] != plain[b] for a, b in planted)
    tested = []
    for fold in range(folds or 1):
        datamodule = prepared(root, split_seed=1, folds=folds, fold=fold, duplicates="group")
        where = split_of(datamodule)
        assert all(where[a] == where[b] for a, b in planted)
        assert {frozenset(pair[:2]) for pair in datamodule.leakage.pairs} >= {frozenset(pair) for pair in planted}
        assert datamodule.leakage.crossing(datamodule.splits) == 0
        for split, samples in datamodule.splits.items():  # still stratified: every class on every side
            assert {label for _, label in samples} == {0, 1, 2}, split
        tested += [path for path, _ in datamodule.splits["test"]]
    if folds:  # the folds still test every image exactly once
        assert sorted(tested) == sorted(plain)


def test_a_groups_file_keeps_each_group_on_one_side_of_every_split_and_fold(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=24)
    images = sorted(path.relative_to(root) for path in root.rglob("*.png"))
    # Groups of three images, numbered across classes: group g holds image g, g+1, g+2 of one class, and the
    # groups named "shared-*" hold one image of every class (one patient, several diagnoses).
    groups = {str(path): f"g{index // 3}" for index, path in enumerate(images)}
    for kind in CLASSES:
        groups[f"{kind}/{kind}_023.png"] = "shared-1"
    (tmp_path / "groups.csv").write_text(
        "path,group\n" + "".join(f"{path},{group}\n" for path, group in groups.items())
    )
    for folds in (None, 4):
        for fold in range(folds or 1):
            datamodule = prepared(root, folds=folds, fold=fold, groups=str(tmp_path / "groups.csv"))
            where = split_of(datamodule)
            sides: dict[str, set[str]] = {}
            for path, group in groups.items():
                sides.setdefault(group, set()).add(where[str(root / path)])
            assert all(len(side) == 1 for side in sides.values()), sides
            assert datamodule.leakage.group_count == len(sides)
    # Without the file, the same folder splits groups.
    where = split_of(prepared(root))
    assert any(
        len({where[str(root / p)] for p, g in groups.items() if g == group}) > 1 for group in set(groups.values())
    )


def test_group_by_keeps_each_sub_folder_on_one_side(tmp_path):
    root = tmp_path / "data"
    for index in range(8):  # eight scenes, each photographed in every class, three times
        for kind in CLASSES:
            make_image_folder(tmp_path / "tmp" / str(index), per_class=3, seed=index)
            shutil.move(tmp_path / "tmp" / str(index) / kind, root / kind / f"scene{index}")
    datamodule = prepared(root, group_by=1, split=(0.6, 0.2, 0.2))
    where = split_of(datamodule)
    for index in range(8):
        assert len({split for path, split in where.items() if f"/scene{index}/" in path}) == 1
    assert datamodule.leakage.group_count == 8
    assert (
        len({split for path, split in split_of(prepared(root, split=(0.6, 0.2, 0.2))).items() if "/scene0/" in path})
        > 1
    )


def test_the_report_and_its_verdict_say_when_groups_were_used_and_warn_of_crossing_duplicates(tmp_path):
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        for unfreeze, acc in ((0, 0.72), (2, 0.84)):
            job = make_fold_run(sweep, unfreeze, fold, acc + noise, seconds=20 + 20 * unfreeze)
            metrics = json.loads((job / "metrics.json").read_text())
            metrics |= {"data/groups": 40, "data/cross_split_duplicates": 3 if fold == 1 else 0}
            (job / "metrics.json").write_text(json.dumps(metrics))
    report = build_report(sweep)
    markdown = report.to_markdown()
    assert "Groups kept together in 10 run(s)" in markdown
    assert "Near-duplicate images cross splits in 2 run(s) and were left in place (up to 3 pairs)" in markdown
    assert report.study.verdict.endswith("may be too high (see duplicates.csv; data.duplicates=group).")


@pytest.mark.parametrize("case", ["missing", "wrong columns", "path not in the folder", "both keys"])
def test_a_bad_groups_setting_stops_with_one_line(tmp_path, image_folder, case):
    groups = tmp_path / "groups.csv"
    overrides = [f"data.groups={groups}"]
    if case == "missing":
        expected = (f"data.groups={groups} is not a file", "path,group")
    elif case == "wrong columns":
        groups.write_text("file,label\ncircle/circle_000.png,a\n")
        expected = ("has the columns ['file', 'label']", "needs a header row with path and group")
    elif case == "path not in the folder":
        groups.write_text("path,group\ncircle/circle_000.png,a\ncircle/nowhere.png,a\n")
        expected = ("1 path(s) are no image under data.root=", "'circle/nowhere.png'", "relative to data.root")
    else:
        groups.write_text("path,group\n")
        overrides.append("data.group_by=1")
        expected = ("data.groups and data.group_by both name groups: keep one of them",)
    result = run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", *overrides, check=False)
    assert_one_line_error(result, *expected)


@pytest.mark.slow
def test_a_run_on_a_folder_with_planted_duplicates_reports_them(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=12)
    planted = plant_copies(root, count=3)
    result = run_cli(tmp_path, *TINY, f"data.root={root}", "trainer.limit_train_batches=1")
    run = tmp_path / "run"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "near-duplicate image pair(s)" in line]
    assert len(lines) == 1 and "cross splits" in lines[0] and "duplicates.csv" in lines[0], lines
    with open(run / "duplicates.csv") as file:
        rows = list(csv.DictReader(file))
    relative = {frozenset(path.removeprefix(f"{root}/") for path in pair) for pair in planted}
    assert {frozenset((row["path_a"], row["path_b"])) for row in rows} >= relative
    crossing = sum(row["split_a"] != row["split_b"] for row in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data/cross_split_duplicates"] == crossing > 0 and metrics["data/groups"] == 0
    assert f"{crossing} near-duplicate image pair(s) cross splits" in lines[0]
