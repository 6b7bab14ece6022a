"""Where a network is cut for the feature cache (`finetune.features.cache`), found and checked on a random batch.

The cut is the first module of the first block that trains (or the head). A network is cut only where that is
exact: the module takes one tensor, runs once per forward pass, nothing skipped before it runs again after it, and
the network run from the cut gives the whole network's output and gradients. Anything else (a DenseNet layer's
list of tensors, a block called twice, a ViT's position embedding added outside any module) declines the cut with
the reason, and training runs uncached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from finetune.features.partial_forward import modes, restore_modes, skipping
from finetune.model.blocks import Block, trainable_parameter_names
from finetune.model.freezing import keep_frozen_in_eval_mode


@dataclass(frozen=True)
class Cut:
    """Where a network is cut for the feature cache.

    Attributes:
        module: the module whose input is cached: the head (transfer learning) or the first block that ever trains.
        skipped: the outermost modules that run before `module` (none at the head, which runs alone); while
            training on the cache they hand their input on unchanged, so the network runs from `module` on.
        shape: the cached tensor of one image.
    """

    module: str
    skipped: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def bytes_per_image(self) -> int:
        return 4 * math.prod(self.shape)  # kept as float32


def find_cut(
    network: nn.Module, blocks: list[Block], head_name: str, depth: int, crop_size: int
) -> tuple[Cut | None, str | None]:
    """Where to cut `network` when its last `depth` blocks (0: none) and its head train, checked on a random batch.

    The cut module is the first one of the first trained block that the forward pass calls (or the head). The
    modules whose forward passes finish before it starts are skipped. The cut is accepted only if, on a random
    batch, (1) running the network from the cut gives the whole network's output, (2) every parameter that trains
    gets a gradient that way, and (3) nothing skipped behaves differently while training (dropout or BatchNorm
    outside the frozen blocks).

    Returns:
        (the cut, None), or (None, why the network cannot run from a cached activation).
    """
    first = blocks[len(blocks) - depth] if depth else None
    targets = first.modules if first else (head_name,)
    device = next(network.parameters()).device
    images = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0)).to(device)
    events: list[tuple[str, str]] = []
    cut_at: list[tuple[int, str, tuple, dict]] = []  # the first target module called: event, name, its inputs

    def start(name: str, arguments: tuple, keywords: dict) -> None:
        if not cut_at and any(name == target or name.startswith(target + ".") for target in targets):
            cut_at.append((len(events), name, arguments, keywords))
        events.append(("start", name))

    hooks = []
    for name, module in network.named_modules():
        if name:
            hooks.append(
                module.register_forward_pre_hook(lambda _, a, k, name=name: start(name, a, k), with_kwargs=True)
            )
            hooks.append(module.register_forward_hook(lambda _, a, o, name=name: events.append(("end", name))))
    saved_modes = modes(network)
    network.eval()
    try:
        try:
            with torch.no_grad():
                output = network(images)
        except Exception as error:  # whatever stops a plain forward pass here stops caching, not training
            return None, f"its forward pass failed on a random batch ({_first_line(error)})"
        if not cut_at:
            return None, f"the forward pass never calls {targets[0]}"
        index, module, arguments, keywords = cut_at[0]
        why_not = _uncacheable(module, arguments, keywords, output)
        if why_not:
            return None, why_not
        activation = arguments[0].detach()
        finished = dict.fromkeys(name for kind, name in events[:index] if kind == "end")  # in order, once each
        skipped = tuple(name for name in finished if name.rpartition(".")[0] not in finished) if first else ()
        why_not = _called_again(module, skipped, events, index)
        if why_not:
            return None, why_not
        cut = Cut(module, skipped, tuple(activation.shape[1:]))
        if first:
            why_not = _why_not_runnable_from(
                network,
                cut,
                activation,
                output,
                trainable_parameter_names(blocks, depth) | _parameter_names(network, head_name),
                blocks[: len(blocks) - depth],
            )
            if why_not:
                return None, why_not
        return cut, None
    finally:
        for hook in hooks:
            hook.remove()
        restore_modes(saved_modes)


def _why_not_runnable_from(
    network: nn.Module, cut: Cut, activation: torch.Tensor, output: torch.Tensor, trained: set[str], frozen: list[Block]
) -> str | None:
    cannot = f"the network cannot run from a cached input of {cut.module}"
    try:
        with torch.no_grad(), skipping(network, cut.skipped):
            rerun = network(activation)
    except Exception as error:  # any failure means the same: this architecture does not split there
        return f"{cannot} ({_first_line(error)})"
    scale = output.abs().max().item() or 1.0
    if rerun.shape != output.shape or not torch.allclose(rerun, output, rtol=1e-3, atol=1e-4 * scale):
        return f"{cannot} (its forward pass does work outside its modules before that block)"
    parameters = dict(network.named_parameters())
    wanted = [parameters[name] for name in sorted(trained)]
    requires = [parameter.requires_grad for parameter in wanted]
    try:
        for parameter in wanted:
            parameter.requires_grad_(True)
        with skipping(network, cut.skipped):
            gradients = torch.autograd.grad(network(activation).float().sum(), wanted, allow_unused=True)
    except Exception as error:
        return f"{cannot} ({_first_line(error)})"
    finally:
        for parameter, flag in zip(wanted, requires, strict=True):
            parameter.requires_grad_(flag)
    untrained = [name for name, gradient in zip(sorted(trained), gradients, strict=True) if gradient is None]
    if untrained:
        return f"{cannot} ({untrained[0]} would not train from there)"
    # While training, frozen blocks run in eval mode; a skipped module outside every block would not.
    network.train()
    keep_frozen_in_eval_mode(network, frozen)
    for name in cut.skipped:
        for inner, module in network.get_submodule(name).named_modules(prefix=name):
            stochastic = isinstance(module, _DropoutNd) and module.p > 0 or "droppath" in type(module).__name__.lower()
            if module.training and (stochastic or isinstance(module, _BatchNorm)):
                return f"{inner} ({type(module).__name__}) acts differently while training, before {cut.module}"
    return None


def _parameter_names(network: nn.Module, module_name: str) -> set[str]:
    return {f"{module_name}.{name}" for name, _ in network.get_submodule(module_name).named_parameters()}


def _uncacheable(module: str, arguments: tuple, keywords: dict, output) -> str | None:
    """Why the cut module's inputs cannot be cached as one tensor per image (None: they can)."""
    if keywords or len(arguments) != 1:
        return f"{module} takes {len(arguments)} positional and {len(keywords)} keyword inputs, not one tensor"
    if not isinstance(arguments[0], torch.Tensor):
        return f"{module} takes a {type(arguments[0]).__name__}, not a tensor"
    if not isinstance(output, torch.Tensor):
        return f"the network returns a {type(output).__name__}, not a tensor"
    return None


def _called_again(module: str, skipped: tuple[str, ...], events: list[tuple[str, str]], index: int) -> str | None:
    """Why running from the cut would not repeat the forward pass: the cut module runs twice (a cached input
    stands for its first call only), or a skipped module runs again after the cut (it would pass its input on)."""
    calls = sum(kind == "start" and name == module for kind, name in events)
    if calls > 1:
        return f"{module} runs {calls} times in one forward pass"
    for kind, name in events[index + 1 :]:
        if kind == "start" and any(name == outer or name.startswith(outer + ".") for outer in skipped):
            return f"{name} runs again after {module}, so it cannot be skipped"
    return None


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
