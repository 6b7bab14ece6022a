"""finetune: adapts pretrained image classifiers to your image folders.

Python API (for notebooks): `finetune.train([...overrides])` returns the metrics of a run as `python train.py`
would make it; `finetune.load(checkpoint).predict(images)` classifies images. Imported on first use, so that
`import finetune.<module>` stays light.
"""

from finetune.config import schema as _schema

__all__ = ["load", "train"]

# conf/train.yaml's structured configs, before any command or notebook composes it (Hydra's compose API included).
_schema.register()


def __getattr__(name: str):
    if name in __all__:
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
