"""Checks of a composed configuration against the constructors it will call, before any work starts.

The YAML configs carry no types, so `data.batch_size=abc` would otherwise reach the data module as text and fail
deep inside it. Each `_target_` section is compared with its constructor's annotations, and a value of the wrong
type stops the run with its key named.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from finetune.errors import UsageError


def check_arguments(cfg: DictConfig, key: str) -> None:
    """Checks the values of the `_target_` section `cfg[key]` against the target's annotated parameters.

    Raises:
        UsageError: naming the key, the value given and the type expected.
    """
    section = cfg[key]
    hints = _parameter_types(get_object(section._target_))
    values = OmegaConf.to_container(section, resolve=True)
    written = OmegaConf.to_container(section, resolve=False)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            # A value taken from elsewhere (model.lr: ${strategy.lr}) is named where the user sets it.
            source = re.fullmatch(r"\$\{([\w.]+)\}", str(written[name]))
            shown_key = source.group(1) if source else f"{key}.{name}"
            raise UsageError(f"{shown_key}={_shown(value)} is not {describe(hints[name])}; "
                             f"e.g. {shown_key}={_example(hints[name])}")


def _parameter_types(target) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        return {}  # annotations this Python cannot evaluate: nothing to check against
    hints.pop("return", None)
    return hints


def matches(value, hint) -> bool:
    """Whether a plain config value (from YAML or an override) fits the annotation `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        item = args[0] if args else Any
        return all(matches(element, item) for element in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # an object type (an Accelerator, a Logger...): not expressible in YAML, nothing to check


def describe(hint) -> str:
    """The annotation in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(arg) for arg in args if describe(arg)))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text",
            type(None): "null"}.get(hint, "")


def _plural(words: str) -> str:
    return {"a whole number": "whole numbers", "a number": "numbers"}.get(words, words)


def _example(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _example(next(arg for arg in args if arg is not type(None)))
    if origin is typing.Literal:
        return str(args[0])
    if origin in (list, tuple, collections.abc.Sequence):
        return f"[{_example(args[0]) if args else 1},{_example(args[0]) if args else 2}]"
    return {bool: "true", int: "32", float: "0.5", str: "name"}.get(hint, "...")


def _shown(value) -> str:
    return "(empty)" if value == "" else repr(value) if isinstance(value, str) else str(value)
