"""Running part of a network: from a cut (the modules before it skipped) or up to a module (its inputs captured).

The feature cache (`finetune.features.cache`) and LP-FT's linear probe (`finetune.training.lp_ft`) are built on these.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext, suppress

import torch
from torch import nn
from torch.utils.data import DataLoader


def modes(network: nn.Module) -> dict[nn.Module, bool]:
    """Every module's train/eval mode, to put back exactly (frozen blocks stay in eval mode in a training model)."""
    return {module: module.training for module in network.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Puts back the modes `modes` saved."""
    for module, training in modes.items():
        module.training = training


def _pass_through(inputs, *args, **kwargs):
    return inputs


@contextmanager
def skipping(network: nn.Module, names: Sequence[str]):
    """Within this block, the named modules hand their input on unchanged: the network runs from the cut on.

    Only the instances' `forward` is replaced, for the duration: parameters, buffers and state dicts stay as they
    are, so checkpoints hold the whole network.
    """
    modules = [network.get_submodule(name) for name in names]
    own = [module.__dict__.get("forward") for module in modules]  # a forward set on the instance, kept
    for module in modules:
        module.forward = _pass_through
    try:
        yield
    finally:
        for module, forward in zip(modules, own, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class _Captured(Exception):
    """Stops a forward pass once the cached module's input is in hand: the rest would be thrown away."""


def forward_to(network: nn.Module, module_name: str, inputs: torch.Tensor) -> torch.Tensor:
    """The input `module_name` gets when `network` runs on `inputs`; the modules after it do not run."""
    captured: list[torch.Tensor] = []

    def capture(module, arguments):
        captured.append(arguments[0])
        raise _Captured

    handle = network.get_submodule(module_name).register_forward_pre_hook(capture)
    try:
        with suppress(_Captured):
            network(inputs)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def module_inputs(
    network: nn.Module,
    module_name: str,
    loader: DataLoader,
    device: torch.device,
    layout: torch.memory_format = torch.contiguous_format,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the network over `loader` in eval mode, up to `module_name`; returns that module's inputs (contiguous)
    and the labels. `layout`: the images' memory format, the network's. `dtype`: torch.bfloat16 runs the pass
    under bf16 autocast and keeps the inputs in bf16 (half the memory); float32 runs and keeps it in fp32."""
    captured: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    bf16 = dtype == torch.bfloat16
    saved = modes(network)
    network.eval()
    try:
        for images, batch_labels in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                inputs = forward_to(network, module_name, images.to(device).contiguous(memory_format=layout))
            captured.append(inputs.detach().to(dtype).cpu().contiguous())
            labels.append(batch_labels)
    finally:
        restore_modes(saved)
    return torch.cat(captured), torch.cat(labels)
