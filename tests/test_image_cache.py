"""The decoded-image cache (data.cache_images) and device-side augmentation (data.augment_on=device): evaluation
images identical to the uncached path, the cache chosen only where it may be, a memory guard, augmentation seeded
by (seed, epoch, index) in both places, and the device doing what the loader does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image_folder, run_cli
from PIL import Image
from torch.utils.data import default_collate

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.image_cache import estimated_bytes, resized_shape
from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing

PREPROCESSING = Preprocessing(32, 36, "bilinear", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """The shapes of `make_image_folder`, plus images of other sizes, aspect ratios and modes."""
    root = make_image_folder(tmp_path_factory.mktemp("mixed"), per_class=6)
    Image.new("RGB", (61, 40), (200, 10, 10)).save(root / "circle" / "wide.png")
    Image.new("L", (30, 71), 99).save(root / "square" / "tall.png")
    Image.new("P", (50, 50)).save(root / "stripes" / "palette.png")
    Image.new("RGBA", (45, 33), (0, 90, 0, 128)).save(root / "stripes" / "alpha.png")
    return root


@pytest.fixture(scope="module")
def smooth_folder(tmp_path_factory):
    """Smooth pictures of three sizes: resampling them twice or once gives nearly the same pixels."""
    root = tmp_path_factory.mktemp("smooth")
    for label in ("a", "b"):
        (root / label).mkdir()
        for index in range(8):
            height, width = [(80, 80), (60, 90), (90, 70)][index % 3]
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([128 + 100 * np.sin(x / 9 + index), 128 + 100 * np.cos(y / 11), (x + y) % 256], -1)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{index}.png")
    return root


def prepared(root, preprocessing=PREPROCESSING, stage="fit", **options) -> ImageFolderDataModule:
    options.setdefault("augment", "basic")  # the augmented path unless a test says otherwise
    datamodule = ImageFolderDataModule(str(root), num_workers=0, batch_size=64, split=(0.5, 0.25, 0.25), **options)
    datamodule.prepare_data()
    datamodule.preprocessing = preprocessing
    datamodule.setup(stage)
    return datamodule


def images_of(dataset, keys) -> torch.Tensor:
    return torch.stack([dataset[key][0] for key in keys])


def test_cached_evaluation_images_equal_the_uncached_ones(mixed_folder):
    uncached, cached = prepared(mixed_folder, cache_images=False), prepared(mixed_folder, cache_images=True)
    assert not uncached.images.decoded and set(cached.images.decoded) == {"train", "val"}
    for split in ("val", "test"):
        cached.setup("test")
        keys = range(len(cached.datasets[split]))
        # Bit for bit: the same PIL resize made the stored copy, the crop and normalisation are exact.
        assert torch.equal(images_of(cached.datasets[split], keys), images_of(uncached.datasets[split], keys))
    assert set(cached.images.decoded) == {"train", "val", "test"}
    # Training images prepared as evaluation images (augment=false) too.
    plain, plain_cached = (
        prepared(mixed_folder, augment=False, cache_images=False),
        prepared(mixed_folder, augment=False),
    )
    assert "train" in plain_cached.images.decoded
    keys = [(index, 0) for index in range(len(plain.datasets["train"]))]
    assert torch.equal(images_of(plain_cached.datasets["train"], keys), images_of(plain.datasets["train"], keys))


def test_decoded_images_have_the_estimated_size_and_shapes(mixed_folder):
    datamodule = prepared(mixed_folder, cache_images=True)
    paths = [path for path, _ in datamodule.splits["train"]]
    decoded = datamodule.images.decoded["train"]
    assert estimated_bytes(paths, 36) == decoded.nbytes == sum(t.numel() for t in decoded)
    for path, image in zip(paths, decoded, strict=True):
        width, height = Image.open(path).size
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *resized_shape(height, width, 36))
    assert min(decoded[0].shape[1:]) == 36


def test_auto_caches_only_where_results_stay_the_same(mixed_folder):
    augmented = prepared(mixed_folder)
    assert set(augmented.images.decoded) == {"val"} and "data.cache_images=true" in augmented.images.not_cached["train"]
    assert set(prepared(mixed_folder, augment=False).images.decoded) == {"train", "val"}
    assert set(prepared(mixed_folder, augment_on="device").images.decoded) == {"train", "val"}
    off = prepared(mixed_folder, cache_images=False)
    assert not off.images.decoded and off.images.not_cached == {
        "train": "data.cache_images=false",
        "val": "data.cache_images=false",
    }
    with pytest.raises(UsageError, match="data.cache_images='sometimes': use auto, true or false"):
        ImageFolderDataModule(str(mixed_folder), cache_images="sometimes")
    with pytest.raises(UsageError, match="data.augment_on=device augments decoded images"):
        ImageFolderDataModule(str(mixed_folder), cache_images=False, augment_on="device")


def test_images_over_the_memory_limit_stay_on_disk_or_stop_the_run(mixed_folder):
    small = prepared(mixed_folder, cache_images_max_gb=1e-6)  # 1 kB
    assert not small.images.decoded and "more than the 0 MB left under the limit" in small.images.not_cached["val"]
    images, labels = next(iter(small.val_dataloader()))  # read from the files instead
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
    with pytest.raises(UsageError, match="data.cache_images=true needs the decoded images in memory"):
        prepared(mixed_folder, cache_images=True, cache_images_max_gb=1e-6)
    with pytest.raises(UsageError, match="data.augment_on=device needs the decoded images in memory"):
        prepared(mixed_folder, augment_on="device", cache_images_max_gb=1e-6)
    # The limit counts what is already cached: room for the training images, then none for the validation ones.
    train_bytes = prepared(mixed_folder, cache_images=True).images.decoded["train"].nbytes
    tight = prepared(mixed_folder, augment=False, cache_images_max_gb=(train_bytes + 100) / 1e9)
    assert set(tight.images.decoded) == {"train"} and "val" in tight.images.not_cached


def test_cached_augmentation_is_seeded_by_epoch_and_index(mixed_folder):
    datamodule = prepared(mixed_folder, cache_images=True)
    train = datamodule.datasets["train"]
    assert torch.equal(train[(3, 1)][0], train[(3, 1)][0])
    assert not torch.equal(train[(3, 1)][0], train[(3, 2)][0])
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32


@pytest.mark.parametrize("options", [{}, {"rotation_degrees": 45}, {"rotation_degrees": 0, "crop_scale": (0.3, 1)}])
def test_device_augmentation_matches_the_loader_augmentation(smooth_folder, options):
    # Same parameters drawn for the same (index, epoch); the loader resamples twice with uint8 rounding between,
    # the device once in float: on smooth pictures they agree within a few grey levels.
    preprocessing = Preprocessing(64, 72, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    loader = prepared(smooth_folder, preprocessing, cache_images=True, **options)
    device = prepared(smooth_folder, preprocessing, augment_on="device", **options)
    dataset = device.datasets["train"]
    assert dataset.canvas == (92, 108)  # images of different sizes on one canvas
    keys = [(index, epoch) for epoch in range(4) for index in range(len(dataset))]
    canvas, labels, params = default_collate([dataset[key] for key in keys])
    assert canvas.dtype == torch.uint8 and params.dtype == torch.int64 and params[:, 5].unique().numel() == 2
    images, same_labels = device.on_after_batch_transfer((canvas, labels, params), 0)
    assert torch.equal(same_labels, labels) and images.shape == (len(keys), 3, 64, 64)
    difference = (images - images_of(loader.datasets["train"], keys)).abs() * 0.5 * 255  # in grey levels
    assert difference.mean() < 0.6 and difference.max() < 4


def test_device_evaluation_batches_equal_the_evaluation_transform(mixed_folder):
    loader = prepared(mixed_folder, cache_images=False)
    device = prepared(mixed_folder, augment_on="device")
    uint8, labels = next(iter(device.val_dataloader()))
    assert uint8.dtype == torch.uint8
    images, _ = device.on_after_batch_transfer((uint8, labels), 0)
    assert torch.equal(images, next(iter(loader.val_dataloader()))[0])
    # Batches the loader already prepared (float) pass through untouched.
    ready = (images, labels)
    assert device.on_after_batch_transfer(ready, 0) is ready
    # The feature cache's passes get prepared images whatever augment_on says.
    assert next(iter(device.ordered_dataloader("val")))[0].dtype == torch.float32


@pytest.mark.slow
def test_cli_trains_with_device_augmentation_in_worker_processes(tmp_path, image_folder):
    result = run_cli(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.augment=basic",
        "data.augment_on=device",
        "trainer.max_epochs=1",
    )
    output = result.stdout + result.stderr
    assert "image cache: train: 27 images decoded" in output and "image cache: val: 6 images" in output
    assert "image cache: test: 3 images" in output
    assert (tmp_path / "run" / "metrics.json").exists()
