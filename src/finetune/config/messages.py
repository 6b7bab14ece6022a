"""Configuration mistakes as one line: what Hydra and OmegaConf raise while composing (an unknown key, option or
override, a wrong type, a value outside an Enum's choices) and a `UsageError` anywhere in a command, turned into
the `error: ...` line every command prints (`finetune.apps`); a structured config's line names its valid keys.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import typing
from typing import Any

from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config.schema import type_error
from finetune.errors import close_matches, find_usage_error, first_line


def error_message(error: BaseException, keys_of: type | None = None) -> str | None:
    """The one line for a problem the user can fix, or None for any other error.

    Args:
        error: what the command raised.
        keys_of: the dataclass of a structured config, whose keys the line names.
    """
    usage_error = find_usage_error(error)
    if usage_error is not None:
        return str(usage_error)
    if keys_of is not None:
        # A value outside a key's choices names those; any other mistake in a structured config, every key.
        choice = _choice_error(error, keys_of)
        if choice is not None:
            return choice
    message = _config_error(error, keys_of)
    if message is not None and keys_of is not None:
        message += f"; valid keys: {valid_keys(keys_of)}"
    return message


def _choice_error(error: BaseException, schema: type) -> str | None:
    """ "unknown format 'tflite': choose format=onnx or format=torchscript" for a value an Enum field lacks."""
    cause = error.__cause__ if isinstance(error, CompactHydraException) else error
    if not isinstance(cause, OmegaConfBaseException) or not cause.full_key:
        return None
    choices = _enum_choices(schema, cause.full_key)
    if choices is None:
        return None
    key = cause.full_key
    return f"unknown {key} {_given(key)!r}: choose {' or '.join(f'{key}={choice}' for choice in choices)}"


def _config_error(error: BaseException, keys_of: type | None) -> str | None:
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return (
            f"unknown {group}={name}{close_matches(name, list(error.options))}: choose one of "
            f"{', '.join(error.options)}"
        )
    if isinstance(error, OverrideParseException):
        if "=" not in error.override:
            return f"{error.override!r} is not key=value"
        return (
            f"cannot read the override {error.override!r} ({first_line(error.message)}); write key=value, "
            "e.g. unfreeze=2 or data.split=[0.7,0.2,0.1]"
        )
    cause = error.__cause__ if isinstance(error, CompactHydraException) else error
    if keys_of is None and (typed := type_error(cause)) is not None:  # train.py's data, model, trainer, strategy
        return typed
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        if type(cause).__name__ in ("ConfigKeyError", "ConfigAttributeError"):  # a key the config does not have
            return _unknown_key(error, cause, keys_of)
        return f"{cause.full_key}: {first_line(cause)}"
    if isinstance(error, CompactHydraException | OmegaConfBaseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return "; ".join(lines[:2]) if lines else type(error).__name__
    return None


def _unknown_key(error: BaseException, cause, keys_of: type | None) -> str:
    if keys_of is not None:  # a closed set of keys: name them (the caller appends them)
        close = close_matches(str(cause.full_key), list(_field_types(keys_of)), n=1)
        return f"unknown key {cause.full_key!r}{close}"
    keys = list(cause.parent_node.keys()) if cause.parent_node is not None else []
    parent = cause.full_key.rpartition(".")[0]
    close = close_matches(str(cause.key), keys, prefix=f"{parent}." if parent else "")
    append = next((line.strip() for line in str(error).splitlines() if line.strip().startswith("To append")), "")
    if cause.parent_node is not None and OmegaConf.get_type(cause.parent_node) not in (dict, None):
        append = ""  # a structured section (finetune.config.schema): its constructor would refuse the new key
    return f"unknown key {cause.full_key}{close}" + (f"; {append[0].lower()}{append[1:]}" if append else "")


def _given(key: str) -> str:
    """The value the user gave `key` on the command line."""
    for argument in sys.argv[1:]:
        name, equals, value = argument.partition("=")
        if equals and name.lstrip("+~") == key:
            return value
    return "?"


def _enum_choices(schema: type, key: str) -> list[str] | None:
    kind = _field_types(schema).get(key)
    for member in (kind, *typing.get_args(kind)):
        if isinstance(member, type) and issubclass(member, enum.Enum):
            return [choice.name for choice in member]
    return None


def valid_keys(schema: type) -> str:
    """ "a, b (required); c, d": every key of a dataclass (nested ones as `data.root`), the required ones first."""
    fields = _field_types(schema)
    defaults = OmegaConf.structured(schema)
    required = [key for key in fields if OmegaConf.is_missing(defaults, key)]
    optional = [key for key in fields if key not in required]
    return f"{', '.join(required)} (required); {', '.join(optional)}" if required else ", ".join(optional)


def _field_types(schema: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    types = {}
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            types |= _field_types(kind, f"{prefix}{field.name}.")
        else:
            types[prefix + field.name] = kind
    return types
