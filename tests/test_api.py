"""The Python API: finetune.train composes the CLI's config and writes the CLI's run dir; finetune.load predicts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLASSES
from PIL import Image

import finetune
from finetune.data.transforms import eval_transform


def test_train_then_load_and_predict(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run = tmp_path / "run"
    metrics = finetune.train(
        [
            "model=mobilenet_v2",
            "model.weights=null",
            "unfreeze=2",
            f"data.root={image_folder}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}",
        ]
    )
    assert callable(finetune.train)  # still the function once the training module is imported (no name clash)
    # The CLI's run dir: its config record, checkpoints, TensorBoard, metrics.json with what train returned.
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["params/trainable"] == 889_923 and 0 <= metrics["test/acc"] <= 1
    assert "unfreeze: 2" in (run / ".hydra" / "config.yaml").read_text()
    assert (run / ".hydra" / "overrides.yaml").exists() and (run / "tensorboard").is_dir()

    classifier = finetune.load(run, device="cpu")  # a run folder: its best model, the one metrics.json scores
    assert classifier.loaded.checkpoint == run / "checkpoints" / "best.ckpt"
    assert classifier.class_names == list(CLASSES)
    paths = sorted(str(path) for path in image_folder.rglob("*.png"))[:5]
    from_paths = classifier.predict(paths)
    from_images = classifier.predict([Image.open(path) for path in paths])
    for by_path, by_image in zip(from_paths, from_images, strict=True):
        assert by_path["class"] == by_image["class"] and set(by_path["probabilities"]) == set(CLASSES)
        assert by_path["probability"] == pytest.approx(by_image["probability"], abs=1e-5)
        assert sum(by_path["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # The network's own answer, at the size it trained at.
    model = classifier.model
    with torch.no_grad():
        logits = model(eval_transform(model.preprocessing)(Image.open(paths[0]).convert("RGB"))[None])
    assert from_paths[0]["probability"] == pytest.approx(float(logits.softmax(dim=1).max()), abs=1e-5)
    assert classifier.predict(str(tmp_path / "missing.png"))[0]["error"]
