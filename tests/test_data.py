"""The split (stratified, seeded, disjoint, stable), existing split folders, and what the loaders yield."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from conftest import CLASSES, make_image_folder
from PIL import Image

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.folders import write_split
from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing

PREPROCESSING = Preprocessing(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def prepared(root, **options) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(root=str(root), num_workers=0, batch_size=4, **options)
    datamodule.prepare_data()
    return datamodule


def test_split_is_stratified_disjoint_and_complete(image_folder):
    datamodule = prepared(image_folder)
    assert datamodule.class_names == list(CLASSES)
    splits = datamodule.splits
    for name, expected in (("train", 9), ("val", 2), ("test", 1)):  # 12 a class: 8.4/2.4/1.2, rounded
        assert Counter(label for _, label in splits[name]) == {0: expected, 1: expected, 2: expected}
    paths = [path for name in splits for path, _ in splits[name]]
    assert len(paths) == len(set(paths)) == 36
    for path, label in splits["train"]:
        assert f"/{CLASSES[label]}/" in path


def test_same_seed_same_split_other_seed_other_split(image_folder):
    first, again = prepared(image_folder, split_seed=3), prepared(image_folder, split_seed=3)
    other = prepared(image_folder, split_seed=4)
    assert first.splits == again.splits
    assert first.splits["val"] != other.splits["val"]


def test_split_does_not_depend_on_listing_order(tmp_path, image_folder):
    # Same files, created in another order: same split.
    copy = tmp_path / "copy"
    for path in sorted(image_folder.rglob("*.png"), reverse=True):
        (copy / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy / path.parent.name / path.name)
    relative = lambda dm: {n: [(p.split("/")[-1], label) for p, label in dm.splits[n]] for n in dm.splits}  # noqa: E731
    assert relative(prepared(image_folder)) == relative(prepared(copy))


def test_existing_train_val_folders_are_honoured(tmp_path):
    make_image_folder(tmp_path / "train", per_class=5, seed=1)
    make_image_folder(tmp_path / "val", per_class=2, seed=2)
    datamodule = prepared(tmp_path)
    assert [len(datamodule.splits[name]) for name in ("train", "val", "test")] == [15, 6, 0]
    assert all("/train/" in path for path, _ in datamodule.splits["train"])
    assert not datamodule.has_test


def test_split_folders_with_other_classes_are_refused(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2)
    make_image_folder(tmp_path / "val", per_class=2)
    shutil.rmtree(tmp_path / "val" / "square")
    with pytest.raises(UsageError, match=r"val has other classes than .*train \(missing: \['square'\]"):
        prepared(tmp_path)


def test_a_class_too_small_to_split_is_named(tmp_path):
    make_image_folder(tmp_path, per_class=6)
    for path in sorted((tmp_path / "square").iterdir())[2:]:
        path.unlink()
    with pytest.raises(UsageError, match="class 'square' has 2 image"):
        prepared(tmp_path)


def test_missing_root_and_single_class_are_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        prepared(tmp_path / "nowhere")
    make_image_folder(tmp_path / "one", per_class=3)
    for kind in CLASSES[1:]:
        shutil.rmtree(tmp_path / "one" / kind)
    with pytest.raises(UsageError, match="1 class folder"):
        prepared(tmp_path / "one")


def test_unknown_demo_names_the_valid_ones():
    with pytest.raises(UsageError, match="unknown data.demo 'mnist': choose one of elpv, elpv4"):
        ImageFolderDataModule(demo="mnist")


def test_loaders_yield_normalised_rgb_batches_at_the_crop_size(tmp_path):
    make_image_folder(tmp_path, per_class=4)
    Image.new("L", (40, 50), 128).save(tmp_path / "circle" / "gray.png")  # grayscale becomes 3 channels
    Image.new("P", (50, 40)).save(tmp_path / "square" / "palette.png")
    datamodule = prepared(tmp_path, split=(0.5, 0.25, 0.25))
    datamodule.preprocessing = PREPROCESSING
    datamodule.setup("fit")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        for images, labels in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.int64
    images, _ = next(iter(datamodule.val_dataloader()))
    assert -2.5 < images.min() < 0 < images.max() < 2.5  # normalised by the weights' mean/std


def test_save_split_writes_relative_paths(tmp_path, image_folder):
    datamodule = prepared(image_folder)
    write_split(tmp_path / "split.csv", datamodule.splits, datamodule.class_names, datamodule.root)
    lines = (tmp_path / "split.csv").read_text().splitlines()
    assert lines[0] == "split,class,path" and len(lines) == 37
    assert lines[1].startswith("train,circle,circle/")
