"""Feature caching: the cached path computes what the uncached one does, is chosen only where it is valid, and
serves every image once per epoch from the right augmented view."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from finetune.data import ImageFolderDataModule
from finetune.errors import UsageError
from finetune.features import ViewDataset, ViewSampler, build_cache, should_cache
from finetune.module import ImageClassifier

CLASSES = ["circle", "square", "stripes"]


def prepared(image_folder, model, **options) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0, image_size=32, **options)
    datamodule.prepare_data()
    datamodule.preprocessing = model.preprocessing
    return datamodule


def test_head_on_cached_features_equals_the_whole_network(image_folder):
    model = ImageClassifier("resnet18", CLASSES, weights=None, unfreeze=0).eval()
    datamodule = prepared(image_folder, model, augment=False)
    cache = build_cache(model, datamodule, views=1, device=torch.device("cpu"))
    images = torch.stack([datamodule.datasets["val"][i][0] for i in range(len(datamodule.datasets["val"]))])
    with torch.no_grad():
        assert torch.allclose(model.classify_features(cache["val"][0]), model(images), atol=1e-5)
    assert cache["train"][0].shape == (1, 27, 512) and cache["val"][1].tolist() == [0, 0, 1, 1, 2, 2]


def test_cache_is_chosen_only_where_it_cannot_change_results(image_folder):
    transfer = ImageClassifier("mobilenet_v2", CLASSES, weights=None, unfreeze=0)
    plain, augmented = prepared(image_folder, transfer, augment=False), prepared(image_folder, transfer)
    assert should_cache("auto", transfer, plain)[0]
    used, reason = should_cache("auto", transfer, augmented)
    assert not used and "training-time augmentation" in reason and "strategy.cache_views" in reason
    assert should_cache(True, transfer, augmented)[0]  # asked for: K augmented views
    assert not should_cache(False, transfer, plain)[0]

    finetune = ImageClassifier("mobilenet_v2", CLASSES, weights=None, unfreeze=2)
    used, reason = should_cache("auto", finetune, plain)
    assert not used and "unfreeze=2 trains backbone blocks" in reason
    with pytest.raises(UsageError, match="cannot apply"):
        should_cache(True, finetune, plain)
    gradual = ImageClassifier("mobilenet_v2", CLASSES, weights=None, unfreeze=1, unfreeze_epoch=3)
    assert not should_cache("auto", gradual, plain)[0]  # its backbone trains later
    bn = ImageClassifier("mobilenet_v2", CLASSES, weights=None, unfreeze=0, train_bn=True)
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


def test_cli_transfer_learning_trains_on_cached_features(tmp_path, image_folder):
    result = run_cli(tmp_path, "model=mobilenet_v2", "model.weights=null", "strategy=transfer",
                     f"data.root={image_folder}", "data.image_size=32", "data.num_workers=0",
                     "strategy.cache_features=true", "strategy.cache_views=2", "trainer.max_epochs=2")
    output = result.stdout + result.stderr
    assert "feature cache on" in output and "feature cache: 2 training view(s), (1280,) features" in output
    assert (tmp_path / "run" / "metrics.json").exists()


def test_cached_and_uncached_transfer_learning_train_the_same_head(image_folder):
    # Same seed, same order (EpochShuffler), same dropout draws: the cache changes only when the backbone runs.
    import lightning as L

    heads = []
    for cached in (False, True):
        L.seed_everything(0)
        model = ImageClassifier("resnet18", CLASSES, weights=None, unfreeze=0, scheduler="constant")
        datamodule = prepared(image_folder, model, augment=False)
        if cached:
            datamodule.use_features(build_cache(model, datamodule, views=1, device=torch.device("cpu")))
            model.trains_on_features = True
        trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
        trainer.fit(model, datamodule=datamodule)
        heads.append(model.network.fc.weight.detach().clone())
    assert torch.allclose(heads[0], heads[1], atol=1e-5)
