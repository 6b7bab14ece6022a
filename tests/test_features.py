"""Feature caching: the cached path computes what the uncached one does (at the head and at a block), is chosen only
where it is valid, and serves every image once per epoch from the right augmented view."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from torch import nn

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.samplers import ViewDataset, ViewSampler
from finetune.errors import UsageError
from finetune.features.cache import build_cache, classify_features, should_cache
from finetune.features.cut import find_cut
from finetune.features.store import SharedFeatures
from finetune.model.blocks import Block
from finetune.model.module import ImageClassifier

CLASSES = ["circle", "square", "stripes"]


def prepared(image_folder, model, **options) -> ImageFolderDataModule:
    options.setdefault("augment", "basic")  # the augmented path unless a test says otherwise
    datamodule = ImageFolderDataModule(
        str(image_folder), batch_size=8, num_workers=0, image_size=32, preprocessing=model.preprocessing, **options
    )
    datamodule.setup("fit")  # without a Trainer: images, every split
    return datamodule


def test_head_on_cached_features_equals_the_whole_network(image_folder):
    model = ImageClassifier("resnet18", CLASSES, weights=None, image_size=32, unfreeze=0).eval()
    datamodule = prepared(image_folder, model, augment=False)
    cut, _ = should_cache("auto", model, datamodule)
    model.features_cut = cut
    cache = build_cache(model, datamodule, cut, views=1, device=torch.device("cpu"))
    images = torch.stack([datamodule.datasets["val"][i][0] for i in range(len(datamodule.datasets["val"]))])
    with torch.no_grad():
        assert torch.allclose(classify_features(model, cache["val"][0]), model(images), atol=1e-5)
    assert cache["train"][0].shape == (1, 27, 512) and cache["val"][1].tolist() == [0, 0, 1, 1, 2, 2]


def test_a_later_run_in_the_process_reuses_the_features_of_the_same_frozen_weights(image_folder):
    """The next fold of a study runs no frozen forward pass, and gets what a fresh computation gives."""
    store = SharedFeatures()  # what train.py keeps for the runs of its process
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", CLASSES, weights=None, image_size=32, unfreeze=1).eval()
    first = prepared(image_folder, model, augment=False, folds=3, fold=0)
    cut, _ = should_cache("auto", model, first)
    build_cache(model, first, cut, views=1, device=torch.device("cpu"), store=store)
    passes = []
    model.network.register_forward_pre_hook(lambda *_: passes.append(1))
    model.network.get_submodule(model.head_name).reset_parameters()  # a new seed redraws the head only
    second = prepared(image_folder, model, augment=False, folds=3, fold=1)
    reused = build_cache(model, second, cut, views=1, device=torch.device("cpu"), store=store)
    assert not passes
    fresh = build_cache(model, second, cut, views=1, device=torch.device("cpu"))  # no store: computed afresh
    assert passes
    for split in ("train", "val", "test"):
        assert torch.equal(reused[split][0], fresh[split][0]) and torch.equal(reused[split][1], fresh[split][1])
    assert reused["train"][0].shape[:2] == (1, len(second.splits["train"]))

    passes.clear()
    with torch.no_grad():
        next(model.network.parameters()).add_(1.0)  # other frozen weights: nothing reused
    build_cache(model, second, cut, views=1, device=torch.device("cpu"), store=store)
    assert passes


def frozen_part_inputs(model, datamodule, views: int, store: SharedFeatures | None = None):
    """The cache `build_cache` makes, and the images it fed the network, in the order it fed them."""
    cut, _ = should_cache("auto", model, datamodule, views)
    fed = []
    hook = model.network.register_forward_pre_hook(lambda _, arguments: fed.append(arguments[0].clone()))
    try:
        cache = build_cache(model, datamodule, cut, views, torch.device("cpu"), store)
    finally:
        hook.remove()
    return cache, torch.cat(fed) if fed else torch.empty(0)


def test_every_depth_trains_on_the_same_augmented_views_as_the_live_loader(image_folder):
    """experiment=depth_study data.augment=basic: the views cached at every cut are the images unfreeze=all's live
    loader serves in its first epochs."""
    views = 2
    fed = {}
    for depth in (0, 2):  # two cuts: the head's input, and features.17's
        model = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=depth)
        datamodule = prepared(image_folder, model)
        cache, images = frozen_part_inputs(model, datamodule, views)
        train = len(datamodule.splits["train"])
        assert cache["train"][0].shape[:2] == (views, train)
        fed[depth] = images[: views * train]  # the training views come first, view by view, in split order
    assert torch.equal(fed[0], fed[2])

    full = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze="all")
    live = prepared(image_folder, full)
    served = [live.datasets["train"][(index, epoch)][0] for epoch in range(views) for index in range(train)]
    assert torch.equal(fed[0], torch.stack(served))
    assert not torch.equal(fed[0][:train], fed[0][train:])  # two views, not one image twice


def test_the_folds_of_a_depth_share_each_images_augmented_views(image_folder):
    """An image's view v is the same in every fold it trains in (seeded by its path, not its place in the fold), so
    the next fold runs the frozen part only over the images and views it has not seen."""
    model = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=0)
    store, views = SharedFeatures(), 2
    folds = [prepared(image_folder, model, folds=3, fold=fold) for fold in (0, 2)]

    def paths(datamodule, *splits):
        return {path for split in splits for path, _ in datamodule.splits[split]}

    def training_views(datamodule, fed):  # a fresh cache feeds every training view first, view by view
        train = [path for path, _ in datamodule.splits["train"]]
        return {(path, view): fed[view * len(train) + i] for view in range(views) for i, path in enumerate(train)}

    _, fed_first = frozen_part_inputs(model, folds[0], views, store)
    fresh, fed_second = frozen_part_inputs(model, folds[1], views)  # no store: every view computed in fold 2's order
    both = paths(folds[0], "train") & paths(folds[1], "train")
    places = [{path: i for i, (path, _) in enumerate(datamodule.splits["train"])} for datamodule in folds]
    assert any(places[0][path] != places[1][path] for path in both)  # at other places in the two folds
    first, second = training_views(folds[0], fed_first), training_views(folds[1], fed_second)
    assert all(torch.equal(first[path, view], second[path, view]) for path in both for view in range(views))

    reused, images = frozen_part_inputs(model, folds[1], views, store)
    new_views = views * len(paths(folds[1], "train") - paths(folds[0], "train"))
    new_plain = len(paths(folds[1], "val", "test") - paths(folds[0], "val", "test"))
    assert len(images) == new_views + new_plain  # nothing seen in fold 0 runs again
    for split in ("train", "val", "test"):  # batched differently: equal to rounding
        torch.testing.assert_close(reused[split][0], fresh[split][0], rtol=1e-4, atol=1e-14)
        assert torch.equal(reused[split][1], fresh[split][1])

    other = prepared(image_folder, model, folds=3, fold=2, crop_scale=(0.5, 1.0))  # other views: nothing reused
    _, images = frozen_part_inputs(model, other, views, store)
    assert len(images) == views * len(paths(other, "train")) + len(paths(other, "val", "test"))


def test_auto_caches_augmented_views_where_the_study_asks_and_trains_the_rest_live(image_folder):
    transfer = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=0)
    augmented = prepared(image_folder, transfer)
    assert not should_cache("auto", transfer, augmented, views=1)[0]
    assert should_cache("auto", transfer, augmented, views=8)[0]
    full = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze="all")
    used, reason = should_cache("auto", full, prepared(image_folder, full), views=8)  # no error: live instead
    assert not used and "every block trains" in reason
    mixed = prepared(image_folder, transfer, mixup=0.2)
    used, reason = should_cache("auto", transfer, mixed, views=8)
    assert not used and "data.mixup and data.cutmix mix whole batches" in reason


def test_cache_is_chosen_only_where_it_cannot_change_results(image_folder):
    transfer = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=0)
    plain, augmented = prepared(image_folder, transfer, augment=False), prepared(image_folder, transfer)
    assert should_cache("auto", transfer, plain)[0]
    used, reason = should_cache("auto", transfer, augmented)
    assert not used and "training-time augmentation" in reason and "strategy.cache_views" in reason
    assert should_cache(True, transfer, augmented)[0]  # asked for: K augmented views
    assert not should_cache(False, transfer, plain)[0]

    finetune = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=2)
    cut, reason = should_cache("auto", finetune, plain)
    assert cut.module == "features.17" and cut.skipped == tuple(f"features.{i}" for i in range(17))
    assert reason.startswith("feature cache on: the frozen blocks before features.17 run once")
    assert not should_cache("auto", finetune, augmented)[0]
    full = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze="all")
    with pytest.raises(UsageError, match="cannot apply: every block trains"):
        should_cache(True, full, plain)
    gradual = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=1, unfreeze_epoch=3)
    assert should_cache("auto", gradual, plain)[0].module == "features.18"  # cut before the deepest it trains
    reaching_all = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=1, unfreeze_every=1)
    assert "every block trains" in should_cache("auto", reaching_all, plain)[1]
    bn = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=0, train_bn=True)
    assert "train_bn=true" in should_cache("auto", bn, plain)[1]
    with pytest.raises(UsageError, match="use auto, true or false"):
        should_cache("sometimes", transfer, plain)


def test_view_sampler_serves_every_image_once_from_view_epoch_mod_k():
    views = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1)  # 3 views of 4 images
    dataset = ViewDataset(views, torch.tensor([0, 1, 0, 1]))
    sampler = ViewSampler(dataset, seed=0)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert sorted(indices) == [(epoch % 3) * 4 + i for i in range(4)]
        assert all(dataset[i][1] == [0, 1, 0, 1][i % 4] for i in indices)


@pytest.mark.slow
def test_cli_transfer_learning_trains_on_cached_features(tmp_path, image_folder):
    result = run_cli(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        "strategy=transfer",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.augment=basic",  # 2 augmented views of each image cached
        "strategy.cache_features=true",
        "strategy.cache_views=2",
        "trainer.max_epochs=2",
    )
    output = result.stdout + result.stderr
    assert "feature cache on" in output and "feature cache: 2 training view(s), (1280,) features" in output
    assert (tmp_path / "run" / "metrics.json").exists()


def trained_on(image_folder, cached: bool, epochs: int = 3, **options) -> dict[str, torch.Tensor]:
    """The parameters that trained, after `epochs` with or without the feature cache (same seed and order)."""
    import lightning as L

    L.seed_everything(0)
    model = ImageClassifier(
        "mobilenet_v2", CLASSES, weights=None, image_size=32, scheduler="constant", lr=0.01, **options
    )
    datamodule = prepared(image_folder, model, augment=False, cache_features="auto" if cached else False)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=datamodule)
    assert (model.features_cut is not None) == cached  # the DataModule's setup chose, the model read it
    trained = {
        name
        for group in model.parameter_groups()
        for name, parameter in model.network.named_parameters()
        if any(parameter is p for p in group["params"])
    }
    return {name: p.detach().clone() for name, p in model.network.named_parameters() if name in trained} | {
        "val/acc": trainer.callback_metrics["val/acc"]
    }


@pytest.mark.parametrize(
    "options",
    [{"unfreeze": 0}, {"unfreeze": 2}, {"unfreeze": 1, "unfreeze_epoch": 1}],
    ids=["transfer", "finetune", "gradual"],
)
def test_training_on_cached_features_trains_what_the_whole_network_does(image_folder, options):
    # Cached: the head's input (transfer) or the frozen blocks' output (fine-tuning); each step runs the rest, with
    # its BatchNorm in training mode and MobileNetV2's dropout before the head. Same seed and order, same dropout
    # draws: the same weights, parameter by parameter.
    uncached, cached = trained_on(image_folder, False, **options), trained_on(image_folder, True, **options)
    assert cached.keys() == uncached.keys()
    assert any(name.startswith("features.18.") for name in cached) == bool(options["unfreeze"])
    for name, value in uncached.items():
        assert torch.allclose(cached[name], value, atol=1e-5), name
    # The check can fail: the head moved from its initial weights (those of seed 0, as in trained_on).
    torch.manual_seed(0)
    initial = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32).network.classifier[1].weight
    assert (uncached["classifier.1.weight"] - initial).abs().max() > 1e-3


def test_networks_that_cannot_run_from_a_block_are_refused_with_the_reason():
    class AddsOutsideModules(nn.Module):
        """Like a ViT: the forward pass adds a parameter between two blocks, outside any module."""

        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)
            self.offset = nn.Parameter(torch.ones(1))

        def forward(self, x):
            x = self.second(self.first(x) + self.offset)
            return self.head(x.mean(dim=(2, 3)))

    class DropsOutsideBlocks(AddsOutsideModules):
        """A dropout that belongs to no block (no parameters) before the cut: it would act only uncached."""

        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.head(self.second(self.drop(self.first(x))).mean(dim=(2, 3)))

    blocks = [
        Block(0, ("first",), ("first.weight", "first.bias", "offset")),
        Block(1, ("second",), ("second.weight", "second.bias")),
    ]
    cut, why_not = find_cut(AddsOutsideModules(), blocks, "head", 1, 16)
    assert cut is None and "cannot run from a cached input of second" in why_not
    cut, why_not = find_cut(DropsOutsideBlocks(), blocks, "head", 1, 16)
    assert cut is None and why_not.startswith("drop (Dropout) acts differently while training")
    network = DropsOutsideBlocks().eval()
    assert find_cut(network, blocks, "head", 0, 16)[0].module == "head"  # the head alone: always possible
    assert not network.training  # modes are put back as they were

    vit = ImageClassifier("vit_b_16", CLASSES, weights=None, unfreeze=2)
    cut, why_not = find_cut(vit.network, vit.blocks, vit.head_name, 2, 224)
    assert cut is None and "cannot run from a cached input of encoder.layers.encoder_layer_10" in why_not


@pytest.mark.slow
def test_cli_fine_tuning_without_augmentation_caches_the_frozen_prefix_by_default(tmp_path, image_folder):
    # strategy.cache_features=auto: on where it cannot change results; the metrics match an uncached run's.
    import json

    common = [
        "model=mobilenet_v2",
        "model.weights=null",
        "strategy=finetune",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.augment=false",
        "trainer.max_epochs=2",
        "trainer.precision=32-true",  # auto decides on timings, which the two runs could read differently
    ]
    metrics = {}
    for setting in ("auto", "false"):
        run_dir = tmp_path / setting
        result = run_cli(tmp_path, *common, f"strategy.cache_features={setting}", run_dir=run_dir)
        output = result.stdout + result.stderr
        metrics[setting] = json.loads((run_dir / "metrics.json").read_text())
        if setting == "auto":
            assert (
                "feature cache on: the frozen blocks before features.17 run once over the data, then each "
                "step runs features.17 + features.18 + head" in output
            )
            assert (
                "feature cache: 1 training view(s), (160, 1, 1) features per image (the input of features.17)" in output
            )
        else:
            assert "feature cache off (strategy.cache_features=false)" in output
    for name in ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "params/trainable"):
        assert metrics["auto"][name] == pytest.approx(metrics["false"][name], abs=1e-5), name


def test_a_cache_over_the_memory_limit_stays_off_or_stops_the_run(image_folder, monkeypatch):
    import finetune.features.cache

    model = ImageClassifier("mobilenet_v2", CLASSES, weights=None, image_size=32, unfreeze=2)
    datamodule = prepared(image_folder, model, augment=False)
    cut, _ = should_cache("auto", model, datamodule)
    needed = cut.bytes_per_image * 36  # every image of the folder, train + val + test
    monkeypatch.setattr(finetune.features.cache, "memory_limit", lambda max_gb: needed - 1)
    cut, reason = should_cache("auto", model, datamodule)
    assert cut is None and "the cached features would take" in reason and "training runs uncached" in reason
    with pytest.raises(UsageError, match="cannot apply: the cached features would take"):
        should_cache(True, model, datamodule)
    monkeypatch.setattr(finetune.features.cache, "memory_limit", lambda max_gb: needed)
    assert should_cache("auto", model, datamodule)[0] is not None
