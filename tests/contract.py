"""The architecture contract, shared by the sweep (tests/test_architectures.py) and one-off surveys."""

from __future__ import annotations

import functools
from unittest import mock

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.model.backbones import create_backbone
from finetune.model.blocks import trainable_parameter_names
from finetune.model.freezing import apply_unfreeze, keep_frozen_in_eval_mode

NUM_CLASSES = 3


@functools.cache  # the contract and the default-path sweep ask for the same models: each is built once for it
def parameter_count(source: str, name: str) -> int:
    """Parameters of the network with its new head, counted without initialising them (`build_uninitialised`)."""
    network = build_uninitialised(source, name).network
    return sum(p.numel() for p in network.parameters())


def build_uninitialised(source: str, name: str):
    """The backbone built on the meta device (no memory, no initialisation time); where a builder computes its
    shapes with tensors (RegNet's widths), on the CPU with the random initialisers skipped, which is what costs
    time for the largest models (RegNetY-128GF: 83 s initialised)."""
    try:
        with torch.device("meta"):
            return create_backbone(name, NUM_CLASSES, source=source, weights=None)
    except NotImplementedError:  # "Cannot copy out of meta tensor": the builder needs real values
        skipped = {function: (lambda tensor, *args, **kwargs: tensor) for function in _INITIALISERS}
        with mock.patch.multiple(nn.init, **skipped):
            return create_backbone(name, NUM_CLASSES, source=source, weights=None)


_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


def check_structure(source: str, name: str, device: str = "meta") -> tuple:
    """Builds `name` (on the meta device: no memory, no initialisation time) and checks its blocks: every
    parameter in exactly one block or the head, at least two blocks, unfreeze=1 trains less than all."""
    if device == "meta":
        backbone = build_uninitialised(source, name)
    else:
        with torch.device(device):
            backbone = create_backbone(name, NUM_CLASSES, source=source, weights=None)
    network, blocks, head = backbone.network, backbone.blocks, backbone.head_name
    sizes = {n: p.numel() for n, p in network.named_parameters()}
    head_parameters = {n for n in sizes if n.startswith(head + ".")}
    in_blocks = [n for block in blocks for n in block.parameters]
    assert head_parameters, f"{name}: the head {head} has no parameters"
    assert len(in_blocks) == len(set(in_blocks)), f"{name}: a parameter is in two blocks"
    assert set(in_blocks) | head_parameters == set(sizes), f"{name}: parameters outside every block and the head"
    assert len(blocks) >= 2, f"{name}: one block, so unfreeze=1 trains everything"

    def trained(depth) -> int:
        return sum(sizes[n] for n in trainable_parameter_names(blocks, depth)) + sum(sizes[n] for n in head_parameters)

    assert trained(1) < trained("all"), f"{name}: unfreeze=1 trains as much as unfreeze=all"
    return network, blocks, head, sizes


def check_contract(source: str, name: str, size: int) -> dict:
    """Builds `name` at random init with a new head, then checks what `unfreeze` promises: the blocks
    (`check_structure`); at unfreeze=1 a forward/backward pass on `size` px images gives gradients to exactly the
    trainable parameters, and frozen blocks' BatchNorm layers stay in eval mode with their statistics unchanged.
    Raises AssertionError on a broken promise (UsageError if the model is refused); returns facts for messages."""
    torch.manual_seed(0)
    network, blocks, head, sizes = check_structure(source, name, device="cpu")
    frozen = apply_unfreeze(network, blocks, head, 1)
    network.train()
    keep_frozen_in_eval_mode(network, frozen)
    frozen_names = {n for block in frozen for n in block.parameters}
    frozen_bn = {
        module_name: module
        for module_name, module in network.named_modules()
        if isinstance(module, _BatchNorm) and module.weight is not None and f"{module_name}.weight" in frozen_names
    }
    statistics = {n: m.running_mean.clone() for n, m in frozen_bn.items() if m.running_mean is not None}

    images = torch.randn(2, 3, size, size)
    try:
        logits = network(images)
    except AssertionError as error:  # the model's own checks (input size, ...): not a broken promise of ours
        raise ValueError(f"{name} does not take {size} px images: {error}") from error
    assert isinstance(logits, torch.Tensor), f"{name}: returns a {type(logits).__name__} in train mode"
    assert logits.shape == (2, NUM_CLASSES), f"{name}: output {tuple(logits.shape)}"
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()

    parameters = dict(network.named_parameters())
    trainable = {n for n, p in parameters.items() if p.requires_grad}
    with_gradient = {n for n, p in parameters.items() if p.grad is not None}
    assert with_gradient == trainable, (
        f"{name}: gradients differ from the trainable set: missing "
        f"{sorted(trainable - with_gradient)[:5]}, extra "
        f"{sorted(with_gradient - trainable)[:5]}"
    )
    for module_name, module in frozen_bn.items():
        assert not module.training, f"{name}: BatchNorm {module_name} of a frozen block is in train mode"
        if module_name in statistics:
            assert torch.equal(statistics[module_name], module.running_mean), (
                f"{name}: BatchNorm {module_name} of a frozen block updated its statistics"
            )
    return {"blocks": len(blocks), "parameters": sum(sizes.values()), "frozen_bn": len(frozen_bn)}
