"""The Python API, for notebooks: `finetune.train([...overrides])` and `finetune.load(run_dir).predict(images)`.

`train` composes the same configuration as `python train.py` (conf/train.yaml, Hydra's compose API), runs the same
`finetune.training.run.run` in the same run dir layout (`.hydra/`, checkpoints, loggers, metrics.json) and returns the
metrics dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/, beside train.py


def train(overrides: Sequence[str] = ()) -> dict[str, float]:
    """Trains as `python train.py <overrides>` does and returns the final metrics (those of metrics.json).

    Args:
        overrides: command-line style overrides, e.g. ["model=mobilenet_v2", "unfreeze=2", "data.root=/images"].
            Sweeps (`-m`, comma lists) are the command line's: run them there.

    Returns:
        The metrics: `val/*` and `test/*` of the best checkpoint, its epoch, parameter counts, fit time.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from finetune.training.run import run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    # What Hydra's run_job does before a job: the run dir, known to ${hydra:runtime.output_dir}, and its record.
    output_dir = Path(cfg.hydra.run.dir).resolve()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    record = output_dir / cfg.hydra.output_subdir
    record.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.save(task, record / "config.yaml", resolve=False)
    OmegaConf.save(cfg.hydra, record / "hydra.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create(list(overrides)), record / "overrides.yaml")
    return run(task)


class Classifier:
    """A trained model for predictions: `predict(paths_or_images)` gives each image's class and probabilities."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def model(self):
        """The `finetune.model.module.ImageClassifier`, in eval mode."""
        return self.loaded.model

    def predict(
        self, images: Sequence[str | Path | Image.Image] | str | Path | Image.Image, batch_size: int = 32
    ) -> list[dict]:
        """Classifies image files or PIL images, as `python -m finetune.predict` does.

        Returns:
            One dict per image: `class` (the most probable), `probability` (its), `probabilities` (every class's);
            an unreadable file gets `error` instead.
        """
        from finetune.data.transforms import eval_transform
        from finetune.predict import classify

        items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        paths = [str(item) for item in items if not isinstance(item, Image.Image)]
        pictures = [item for item in items if isinstance(item, Image.Image)]
        if paths and pictures:
            raise TypeError("predict takes file paths or PIL images, not both in one call")
        if paths:
            probabilities, errors = classify(self.loaded, paths, batch_size, num_workers=0)
        else:
            transform = eval_transform(self.loaded.preprocessing)
            batch = torch.stack([transform(picture.convert("RGB")) for picture in pictures])
            with torch.inference_mode():
                logits = torch.cat([self.model(chunk.to(self.loaded.device)) for chunk in batch.split(batch_size)])
            probabilities, errors = logits.float().softmax(dim=1).cpu(), {}
        return [
            {"error": errors[index]} if index in errors else _prediction(row, self.class_names)
            for index, row in enumerate(probabilities)
        ]


def _prediction(row: torch.Tensor, class_names: list[str]) -> dict:
    best = int(row.argmax())
    return {
        "class": class_names[best],
        "probability": float(row[best]),
        "probabilities": dict(zip(class_names, row.tolist(), strict=True)),
    }


def load(checkpoint: str | Path, device: str = "auto", image_size: int | None = None) -> Classifier:
    """Loads a trained model for predictions: `load("outputs/<date>/<run>")` loads the run's best model.

    Args:
        checkpoint: a run folder (its `checkpoints/best.ckpt`, the model metrics.json scores), or a .ckpt file
            written by training, as `python -m finetune.predict checkpoint=...` takes either.
        device: "auto", "cpu", "cuda", ...
        image_size: crop size; None: the size the run trained at.
    """
    from finetune.inference.checkpoint import InferenceOptions, load_model

    return Classifier(load_model(InferenceOptions(checkpoint=str(checkpoint), device=device, image_size=image_size)))
