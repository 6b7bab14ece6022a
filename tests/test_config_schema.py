"""train.py's structured configs (finetune.config.schema) mirror the constructors they configure."""

from __future__ import annotations

import dataclasses
import inspect

import lightning as L
import pytest
from omegaconf import MISSING

from finetune.config.schema import Data, Model, Trainer
from finetune.data.datamodule import ImageFolderDataModule
from finetune.model.module import ImageClassifier

# Lightning's arguments newer than the oldest Lightning pyproject.toml admits (Trainer's docstring says why).
NEWER = {"enable_autolog_hparams", "model_registry"}


@pytest.mark.parametrize(
    ("schema", "target"), [(Data, ImageFolderDataModule), (Model, ImageClassifier), (Trainer, L.Trainer)]
)
def test_each_schema_has_its_constructors_parameters_and_defaults(schema, target):
    parameters = {name: p for name, p in inspect.signature(target.__init__).parameters.items() if name != "self"}
    fields = {field.name: field for field in dataclasses.fields(schema) if not field.name.startswith("_")}
    assert set(fields) <= set(parameters), "a field the constructor does not take"
    assert set(parameters) - set(fields) <= (NEWER if target is L.Trainer else set()), "a parameter left out"
    for name, field in fields.items():
        default = parameters[name].default
        if default is inspect.Parameter.empty:
            expected = MISSING
        elif isinstance(default, tuple):
            expected = list(default)
        elif default is None or isinstance(default, int | float | str):
            expected = default
        else:
            expected = None  # an object: the YAML cannot hold it
        given = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert given == expected, name
