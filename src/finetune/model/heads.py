"""New heads: the pretrained classifier replaced by one sized to the data, for every kind of classifier torchvision
and timm models carry (a Linear layer, SqueezeNet's convolution, timm's own `reset_classifier`, auxiliary heads),
and the dropout in front of it."""

from __future__ import annotations

from torch import nn

from finetune.errors import UsageError, first_line


def switch_off_auxiliary_classifiers(network: nn.Module) -> None:
    """Removes GoogLeNet's and Inception-v3's auxiliary classifiers, as torchvision does when it loads their
    pretrained weights: they help train from scratch on ImageNet, and in train mode make the network return a
    tuple. Fine-tuning trains the main classifier alone, so the network always returns one tensor."""
    if hasattr(network, "aux_logits"):
        network.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(network, name):
                setattr(network, name, None)


def replace_squeezenet_head(network: nn.Module, num_classes: int, hidden_dim: int | None, dropout: float | None) -> str:
    """SqueezeNet classifies with a 1x1 convolution, a ReLU and global pooling (`classifier`): the new head is
    dropout, a 1x1 convolution to `num_classes` and the pooling, without the ReLU, which would keep every logit
    at or above zero (a class the head starts below zero on could never recover)."""
    if hidden_dim is not None:
        raise UsageError(
            "SqueezeNet classifies with a convolution, not a Linear layer: model.head_hidden_dim "
            "does not apply to it; leave it null"
        )
    old = network.classifier
    conv = next(module for module in old if isinstance(module, nn.Conv2d))
    own_dropout = next(module.p for module in old if isinstance(module, nn.Dropout))
    network.classifier = nn.Sequential(
        nn.Dropout(own_dropout if dropout is None else dropout),
        nn.Conv2d(conv.in_channels, num_classes, kernel_size=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
    return "classifier"


def reset_timm_classifier(network: nn.Module, name: str, num_classes: int, hidden_dim: int | None) -> str:
    """Gives a timm network a new classifier with timm's own `reset_classifier`; returns its module name.

    Distilled models (DeiT, LeViT) have two classifiers, one on the class token and one on the distillation
    token, averaged at inference: the new distillation classifier is the new class-token one, shared (one set of
    weights on both tokens). CrossViT's two classifiers (one per branch, of different widths) stay two, trained
    together as the head.
    """
    try:
        network.reset_classifier(num_classes)
        classifier = network.get_classifier()
    except (NotImplementedError, AttributeError, TypeError) as error:
        raise UsageError(
            f"timm model {name!r} cannot get a new classifier ({first_line(error)}); pick another architecture"
        ) from error
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    names_of = {id(module): module_name for module_name, module in network.named_modules()}
    if not all(id(head) in names_of for head in heads):
        raise UsageError(
            f"timm model {name!r}: its classifier is not one of its modules, so it cannot be "
            "replaced; pick another architecture"
        )
    names = [names_of[id(head)] for head in heads]
    for other_name, other in zip(names[1:], heads[1:], strict=True):
        shapes = [[tuple(p.shape) for p in module.parameters()] for module in (heads[0], other)]
        if type(other) is not type(heads[0]) or shapes[0] != shapes[1]:
            raise UsageError(
                f"timm model {name!r} has classifiers of different shapes ({', '.join(names)}); "
                "pick another architecture"
            )
        replace_module(network, other_name, heads[0])
    if hidden_dim is not None and not isinstance(heads[0], nn.Linear):
        raise UsageError(
            f"timm model {name!r} classifies with a {type(heads[0]).__name__} ({names[0]}), not a "
            "Linear layer: model.head_hidden_dim does not apply to it; leave it null"
        )
    return names[0]


def last_linear(network: nn.Module) -> str:
    """The classifier of a torchvision network: its last Linear layer (fc, classifier.1, heads.head, ...)."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UsageError(f"{type(network).__name__} has no Linear classifier to replace")
    return names[-1]


def make_head(in_features: int, num_classes: int, hidden_dim: int | None, dropout: float | None) -> nn.Module:
    if hidden_dim is None:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2 if dropout is None else dropout),
        nn.Linear(hidden_dim, num_classes),
    )


def replace_module(network: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = network.get_submodule(parent_path) if parent_path else network
    setattr(parent, child, new)


def dropout_before_head(network: nn.Module, head_name: str) -> float:
    """The dropout probability the architecture applies to the head's input (0 if none)."""
    dropouts = _sibling_dropouts(network, head_name)
    if dropouts:
        return dropouts[0].p
    return float(getattr(network, "drop_rate", 0.0) or 0.0)


def _sibling_dropouts(network: nn.Module, head_name: str) -> list[nn.Dropout]:
    parent_path = head_name.rpartition(".")[0]
    parent = network.get_submodule(parent_path) if parent_path else network
    return [m for m in parent.children() if isinstance(m, nn.Dropout)]


def set_dropout_before_head(network: nn.Module, head_name: str, p: float) -> None:
    """Sets the architecture's own dropout in front of the classifier (torchvision: a sibling Dropout;
    timm: the `drop_rate` the head reads)."""
    dropouts = _sibling_dropouts(network, head_name)
    if dropouts:
        for module in dropouts:
            module.p = p
    elif hasattr(network, "drop_rate"):
        network.drop_rate = p
    else:
        raise UsageError(
            f"{type(network).__name__} has no dropout before its classifier to set; "
            "use model.head_hidden_dim=<units> for a head with its own dropout"
        )
