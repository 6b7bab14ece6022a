"""How images must be prepared for a network's pretrained weights: sizes, crop, interpolation, mean and std.

It comes from the weights' own metadata (`finetune.model.backbones`), travels in every checkpoint, and drives the
transforms of training, prediction and export alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from finetune.errors import UsageError


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for the pretrained weights (from the weights' own metadata).

    Attributes:
        crop_size: side of the square the network sees.
        resize_size: shorter side after resizing, before the centre crop (evaluation only).
        interpolation: a `torchvision.transforms.InterpolationMode` value: "bilinear", "bicubic", ...
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        crop_mode: how evaluation images become `crop_size` squares (timm's pretrained `crop_mode`): "center"
            (shorter side to `resize_size`, centre crop), "squash" (both sides to `resize_size`, ignoring the
            aspect ratio, then centre crop) or "border" (longer side to `resize_size`, then centre crop or pad
            with the mean colour).
    """

    crop_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: str = "center"

    def at_size(self, crop_size: int | None, crop_pct: float | None = None) -> Preprocessing:
        """The same preprocessing at another crop size, keeping the weights' resize-to-crop ratio unless `crop_pct`
        (timm's name: the share of the resized side the centre crop keeps; 1.0 keeps the whole image) is given."""
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise UsageError(f"model.crop_pct={crop_pct} must be in (0, 1]: 1.0 keeps the whole image")
        crop_size = self.crop_size if crop_size is None else crop_size
        if crop_pct is None:
            if crop_size == self.crop_size:
                return self
            resize = round(crop_size * self.resize_size / self.crop_size)
        else:
            resize = round(crop_size / crop_pct)
        return Preprocessing(crop_size, resize, self.interpolation, self.mean, self.std, self.crop_mode)

    def as_dict(self) -> dict:
        """Plain values, for checkpoints and files."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(
            values["crop_size"],
            values["resize_size"],
            values["interpolation"],
            tuple(values["mean"]),
            tuple(values["std"]),
            values.get("crop_mode", "center"),
        )
