"""finetune: adapts pretrained image classifiers to your image folders.

Python API (for notebooks): `finetune.train([...overrides])` returns the metrics of a run as `python train.py`
would make it; `finetune.load(checkpoint).predict(images)` classifies images. Imported on first use, so that
`import finetune.<module>` stays light.
"""

__all__ = ["load", "train"]


def __getattr__(name: str):
    if name in __all__:
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
