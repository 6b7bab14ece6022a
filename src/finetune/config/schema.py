"""Structured configs for train.py's `data`, `model`, `trainer` and `strategy`: Hydra type-checks them as it composes.

`Data`, `Model` and `Trainer` mirror their constructors' signatures (`ImageFolderDataModule`, `ImageClassifier`,
`lightning.Trainer`): one field per parameter, typed as annotated, with its default (tests/test_config_schema.py
fails when they drift apart). `Strategy` is ours alone. conf/train.yaml puts each under its section
(`schema@data: data`, ...) before the YAML, so `data.batch_size=abc` stops while composing, and a mistyped key
names the valid ones, each in one line (`type_error` below, `finetune.apps`).

OmegaConf types plain values, lists of them and `Optional` of either: any other union (`unfreeze: int | str`, a
Trainer's `devices`) is `Any`, checked by the constructor itself. Kept free of torch and Lightning imports: the
package registers these when it is imported (`finetune/__init__.py`), for every command and every compose call.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError


@dataclass
class Strategy:
    """What trains and how fast (conf/strategy/*.yaml; conf/train.yaml says what each key does)."""

    name: str = MISSING
    unfreeze_epoch: int = 0
    unfreeze_every: int | None = None
    unfreeze_limit: Any = None  # a number of blocks or "all"
    optimizer: str = "adamw"
    lr: float = 1.0e-3
    backbone_lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float = 1.0e-4
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    cache_features: Any = "auto"  # auto, true or false
    cache_views: int = 1
    linear_probe_steps: int = 0


@dataclass
class Data:
    """`finetune.data.datamodule.ImageFolderDataModule`"s arguments (conf/data/)."""

    _target_: str = "finetune.data.datamodule.ImageFolderDataModule"
    root: str | None = None
    demo: str = "elpv"
    split: list[float] = field(default_factory=lambda: [0.7, 0.2, 0.1])
    split_seed: int = 0
    batch_size: int = 32
    num_workers: int | None = None
    image_size: int | None = None
    augment: Any = "none"
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    rotation_degrees: float = 15.0
    horizontal_flip: bool = True
    strict: bool = False
    balance: str | None = "loss_weights"
    cache_images: Any = "auto"
    cache_images_max_gb: float | None = None
    augment_on: str = "loader"
    preprocessing: Any = None
    folds: int | None = None
    fold: int = 0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    cache_features: Any = False  # true, false or "auto"
    cache_views: int = 1
    feature_store: Any = None  # run() passes the process's store at instantiate, never the YAML
    feature_precision: Any = None  # "auto" or a Lightning precision (conf/data: trainer.precision)
    output_dir: str | None = None
    groups: str | None = None
    group_by: int | None = None
    duplicates: str = "report"
    duplicate_distance: int = 6


@dataclass
class Model:
    """`finetune.model.module.ImageClassifier`"s arguments (conf/model/, conf/train.yaml"s `model`); `class_names`
    and `class_weights` come from the data, at `instantiate`."""

    _target_: str = "finetune.model.module.ImageClassifier"
    _convert_: str = "all"  # plain lists, not ListConfigs: the checkpoint"s hyperparameters load without OmegaConf
    name: str = MISSING
    class_names: list[str] = MISSING
    source: str = "torchvision"
    weights: str | None = "DEFAULT"
    unfreeze: Any = 0
    unfreeze_epoch: int = 0
    unfreeze_every: int | None = None
    unfreeze_limit: Any = None
    train_bn: bool = False
    bn_eval: bool = False
    head_hidden_dim: int | None = None
    head_dropout: float | None = None
    optimizer: str = "adamw"
    lr: float = 0.001
    backbone_lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None
    channels_last: Any = "auto"
    log_misclassified: int = 16
    compile: Any = False
    image_size: int | None = None
    crop_pct: float | None = None


@dataclass
class Trainer:
    """`lightning.Trainer`"s arguments (conf/trainer/), every one: `trainer.<name>=<value>` sets any. Lightning 2.5"s
    `enable_autolog_hparams` and `model_registry` are left out: a default written here would be an unknown
    argument to Lightning 2.4, the oldest pyproject.toml admits."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: Any = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None  # conf/trainer/default.yaml: auto (finetune.model.precision), resolved by run()
    logger: Any = None
    callbacks: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Any = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    plugins: Any = None
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    default_root_dir: Any = None


SCHEMAS = {"data": Data, "model": Model, "trainer": Trainer, "strategy": Strategy}


def register() -> None:
    """Stores the schemas in Hydra's ConfigStore as the options of the `schema` group (conf/train.yaml)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)


def type_error(error: BaseException) -> str | None:
    """ "data.batch_size='abc' is not a whole number; e.g. data.batch_size=32" for a value of the wrong type in a
    structured config; a value taken from elsewhere (`data.split_seed: ${seed}`) is named where the user sets it.
    None for any other error, or where the field's type is not known."""
    if not isinstance(error, ValidationError):
        return None
    parent = error.parent_node
    schema = getattr(getattr(parent, "_metadata", None), "object_type", None)
    if not dataclasses.is_dataclass(schema) or error.key is None:
        return None
    hint = typing.get_type_hints(schema).get(str(error.key))
    words = describe(hint)
    if not words:
        return None
    node = parent._get_node(error.key)
    source = re.fullmatch(r"\$\{([\w.]+)\}", str(node._value() if node is not None else ""))
    key = source.group(1) if source else str(error.full_key)
    value = error.value
    shown = "(empty)" if value == "" else repr(value) if isinstance(value, str) else str(value)
    return f"{key}={shown} is not {words}; e.g. {key}={_example(hint)}"


def describe(hint) -> str:
    """The annotation in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(arg) for arg in args if describe(arg)))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}.get(
        hint, ""
    )


def _plural(words: str) -> str:
    return {"a whole number": "whole numbers", "a number": "numbers"}.get(words, words)


def _example(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _example(next(arg for arg in args if arg is not type(None)))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"[{_example(args[0]) if args else 1},{_example(args[0]) if args else 2}]"
    return {bool: "true", int: "32", float: "0.5", str: "name"}.get(hint, "...")


def check_resolved(cfg, sections: tuple[str, ...] = tuple(SCHEMAS)) -> None:
    """Resolves the sections' interpolations now (`model.lr: ${strategy.lr}`, `data.split_seed: ${seed}`): a value
    of the wrong type stops the run before any work, named where the user set it.

    Raises:
        UsageError: the line `type_error` writes.
    """
    from finetune.errors import UsageError

    for section in sections:
        try:
            OmegaConf.to_container(cfg[section], resolve=True)
        except ValidationError as error:
            message = type_error(error)
            if message is None:
                raise
            raise UsageError(message) from error
