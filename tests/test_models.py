"""Contract over every conf/model/*.yaml (random init): output shape, blocks, what each unfreeze depth trains."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from finetune.errors import find_usage_error
from finetune.model.module import ImageClassifier
from finetune.training.callbacks import use_memory_format

MODEL_CONFIGS = sorted(path.stem for path in (REPO / "conf" / "model").glob("*.yaml"))

# The block table of the README: blocks per model, and what unfreeze=1 and 2 add to the head.
BLOCKS = {
    "convnext_tiny": (8, "features.7 + classifier.0", "features.6"),
    "efficientnet_b0": (9, "features.8", "features.7"),
    "efficientnet_lite0": (17, "blocks.6 + conv_head + bn2", "blocks.5.3"),
    "efficientnet_lite1": (22, "blocks.6 + conv_head + bn2", "blocks.5.4"),
    "efficientnet_lite2": (22, "blocks.6 + conv_head + bn2", "blocks.5.4"),
    "mobilenet_v2": (19, "features.18", "features.17"),
    "mobilenet_v3_large": (17, "features.16 + classifier.0", "features.15"),
    "mobilenet_v3_small": (13, "features.12 + classifier.0", "features.11"),
    "resnet18": (9, "layer4.1", "layer4.0"),
    "resnet50": (17, "layer4.2", "layer4.1"),
    "timm": (9, "layer4.1", "layer4.0"),  # model.name=resnet18
    "torchvision": (17, "stage4.3 + conv5", "stage4.2"),  # model.name=shufflenet_v2_x0_5
    "vit_b_16": (13, "encoder.layers.encoder_layer_11 + encoder.ln", "encoder.layers.encoder_layer_10"),
}


def build(model: str, unfreeze, num_classes: int = 3, *extra: str) -> ImageClassifier:
    overrides = [f"model={model}", "model.weights=null", f"unfreeze={unfreeze}", *extra]
    if model == "timm":
        overrides.append("model.name=resnet18")
    if model == "torchvision":
        overrides.append("model.name=shufflenet_v2_x0_5")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.model, class_names=[f"class{i}" for i in range(num_classes)])


def trainable(model: ImageClassifier) -> set[str]:
    return {name for name, p in model.network.named_parameters() if p.requires_grad}


def test_every_model_config_is_in_the_block_table():
    assert sorted(BLOCKS) == MODEL_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_contract(name):
    count, last, second_last = BLOCKS[name]
    model = build(name, 0)
    assert len(model.blocks) == count
    assert [model.blocks[-1].label, model.blocks[-2].label] == [last, second_last]

    crop = model.preprocessing.crop_size
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, crop, crop)).shape == (2, 3)

    head = {n for n, _ in model.network.named_parameters() if n.startswith(model.head_name + ".")}
    everything = {n for n, _ in model.network.named_parameters()}
    assert trainable(model) == head  # unfreeze=0: transfer learning trains the head alone
    block_parameters = [set(b.parameters) for b in model.blocks]
    assert set().union(*block_parameters) | head == everything  # every parameter has a place
    assert sum(map(len, block_parameters)) + len(head) == len(everything)  # and only one

    counts = []
    for depth in (1, 2):
        deeper = build(name, depth)
        expected = head | set(deeper.blocks[-1].parameters)
        if depth == 2:
            expected |= set(deeper.blocks[-2].parameters)
        assert trainable(deeper) == expected
        counts.append(deeper.parameter_counts()[0])
    full = build(name, "all")
    assert trainable(full) == everything
    # Every parameter gets a gradient: DDP with find_unused_parameters=false (trainer=ddp) has nothing to wait for
    # at any depth, since frozen parameters are never registered with it.
    full.train()
    size = crop if name == "vit_b_16" else 32  # small and quick; torchvision's ViT takes only its own size
    full(torch.rand(2, 3, size, size)).logsumexp(dim=1).sum().backward()
    assert {n for n, p in full.network.named_parameters() if p.grad is None} == set()
    assert model.parameter_counts()[0] < counts[0] < counts[1] < full.parameter_counts()[0]


def test_mobilenet_v2_unfreeze_2_trains_exactly_the_tutorials_layers():
    model = build("mobilenet_v2", 2, 6, "strategy.scheduler=constant")
    prefixes = {".".join(name.split(".")[:2]) for name in trainable(model)}
    assert prefixes == {"features.17", "features.18", "classifier.1"}
    assert model.parameter_counts()[0] == 893_766
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_hidden_layer_head():
    model = build("mobilenet_v2", 0, 4, "model.head_hidden_dim=128", "model.head_dropout=0.3")
    head = model.network.get_submodule(model.head_name)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].in_features == 1280 and head[0].out_features == 128 and head[2].p == 0.3
    assert model.parameter_counts()[0] == 1280 * 128 + 128 + 128 * 4 + 4


@pytest.mark.parametrize("value", [-1, 20, "2.5", "some", "true"])
def test_bad_unfreeze_values_name_what_is_accepted(value):
    with pytest.raises(Exception) as raised:
        build("mobilenet_v2", value)
    assert "mobilenet_v2 has 19 blocks" in str(find_usage_error(raised.value))


def test_transfer_vs_finetune_experiment_composes_the_tutorial_study():
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=transfer_vs_finetune"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweeper.params.strategy == "transfer,finetune,full"
    assert (cfg.model.name, cfg.trainer.max_epochs, cfg.seed) == ("mobilenet_v2", 20, 42)


def test_channels_last_auto_lays_out_convolutional_networks_nhwc_on_cpu_unless_compiled():
    # Eager CPU steps measured 1.2-2x faster NHWC; compiled CPU code gained nothing (bench/RESULTS.md).
    def layout(name: str, **options) -> tuple[bool, bool]:
        model = ImageClassifier(name, ["a", "b"], weights=None, **options)
        use_memory_format(model, torch.device("cpu"))
        stem = next(m for m in model.network.modules() if isinstance(m, torch.nn.Conv2d))
        return model.uses_channels_last, stem.weight.is_contiguous(memory_format=torch.channels_last)

    assert layout("mobilenet_v2") == (True, True)
    assert layout("mobilenet_v2", compile=True) == (False, False)
    assert layout("mobilenet_v2", channels_last=False) == (False, False)
    assert layout("mobilenet_v2", channels_last=True, compile=True) == (True, True)
    assert layout("vit_b_16")[0] is False  # one convolution (the patch embedding): nothing to gain
