"""Image transforms (torchvision.transforms.v2): what the pretrained weights expect, training-time augmentation of
each image (in the loader's workers), and of whole batches on the training device (data.augment_on=device).

With `augment_on=loader` (the default) every loader worker crops, rotates, flips and normalises each image on
the CPU. With `augment_on=device` the workers only hand over the decoded images (see `finetune.data.image_cache`) as
uint8 tensors of one fixed size, with each image's random parameters, and the device does the rest for the
whole batch at once: one `affine_grid` + `grid_sample` covers the random resized crop, the rotation and the
flip, then the batch is normalised. A GPU then gets a third of the bytes over PCIe (uint8 at the resize size, not
float32 at the crop size) and no per-image work waits on the CPU.

The random parameters are drawn exactly as the loader-side transform draws them (the same torchvision
`make_params` calls, in the same order, from a generator seeded by (seed, epoch, image path)), so both places
train on the same crops, angles and flips, and a resumed run draws what an uninterrupted one would. The pixels differ
slightly: the loader resamples twice (crop-resize, then rotate) and rounds to uint8 in between; the device
resamples once, in float.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch.nn import functional as nnF
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing
from finetune.model.timm_import import import_timm


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize, centre crop, normalise: exactly what the pretrained weights were evaluated with (timm's eval
    transform, its `crop_mode` included: `Preprocessing.crop_mode`)."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    size, crop = preprocessing.resize_size, preprocessing.crop_size
    if preprocessing.crop_mode == "squash":
        resize = [T.Resize((size, size), interpolation=interpolation, antialias=True), T.CenterCrop(crop)]
    elif preprocessing.crop_mode == "border":
        timm_transforms = import_timm().data.transforms
        fill = [round(255 * value) for value in preprocessing.mean]
        resize = [
            timm_transforms.ResizeKeepRatio(size, interpolation=preprocessing.interpolation, longest=1.0),
            timm_transforms.CenterCropOrPad(crop, fill=fill),
        ]
    else:
        resize = [T.Resize(size, interpolation=interpolation, antialias=True), T.CenterCrop(crop)]
    return T.Compose([*resize, *_to_normalised_tensor(preprocessing)])


# data.augment: the training-time augmentation preset. true/false stay accepted as basic/none.
PRESETS = ("basic", "randaugment", "trivialaugment", "none")


def augment_preset(value: bool | str | None) -> str:
    """The preset named by `data.augment`: true is basic (the tutorials' crop/rotate/flip), false or null none.

    Raises:
        UsageError: `value` names no preset.
    """
    if value is True:
        return "basic"
    if value is False or value is None:
        return "none"
    if value not in PRESETS:
        raise UsageError(f"data.augment={value!r}: choose one of {', '.join(PRESETS)} (true is basic, false none)")
    return value


def train_transform(
    preprocessing: Preprocessing,
    crop_scale: Sequence[float],
    rotation_degrees: float,
    horizontal_flip: bool,
    preset: str = "basic",
    random_erasing: float = 0.0,
) -> T.Compose:
    """A training-time augmentation preset at the weights' crop size and interpolation.

    Args:
        preprocessing: the weights' preprocessing (crop size, interpolation, normalisation).
        crop_scale: area range of the random resized crop (every preset crops).
        rotation_degrees: random rotation range (basic only: RandAugment and TrivialAugment rotate themselves).
        horizontal_flip: random horizontal flips (every preset).
        preset: "basic" (crop, rotate, flip: the tutorials'), "randaugment" (crop, flip, then torchvision's
            RandAugment: 2 random operations of magnitude 9 out of 31) or "trivialaugment" (crop, flip, then
            TrivialAugmentWide: one random operation at a random magnitude, no tuning).
        random_erasing: probability of erasing one random rectangle of the normalised image (0: off).
    """
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps = [
        T.RandomResizedCrop(
            preprocessing.crop_size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True
        )
    ]
    if rotation_degrees and preset == "basic":
        steps.append(T.RandomRotation(rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    if horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if preset == "randaugment":
        steps.append(T.RandAugment(interpolation=InterpolationMode.BILINEAR))
    elif preset == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    steps.extend(_to_normalised_tensor(preprocessing))
    if random_erasing:
        steps.append(T.RandomErasing(p=random_erasing, value=0))  # 0: the data's mean colour after normalising
    return T.Compose(steps)


def batch_mixing(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> T.Transform | None:
    """MixUp and/or CutMix of whole training batches (one of them, at random, per batch, if both are set).

    Labels come back as class probabilities (B, classes); the training loss takes them as they are.

    Args:
        num_classes: the number of classes.
        mixup: MixUp's Beta(alpha, alpha) parameter (0: off); 0.2 to 0.4 is usual for fine-tuning.
        cutmix: CutMix's alpha (0: off); 1.0 is usual.
    """
    for name, alpha in (("data.mixup", mixup), ("data.cutmix", cutmix)):
        if alpha < 0:
            raise UsageError(f"{name}={alpha} must be 0 (off) or a positive Beta alpha such as 0.2 or 1.0")
    mixers = ([T.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
        [T.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else []
    )
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else T.RandomChoice(mixers)


def _to_normalised_tensor(preprocessing: Preprocessing) -> list:
    return [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
    ]


# Whole batches on the training device (data.augment_on=device).

PLACES = ("loader", "device")
# Integer micro-degrees: batches then hold no floating-point tensor for a `*-true` precision plugin to cast.
ANGLE_SCALE = 1_000_000


def augmentation_seed(seed: int, epoch: int, image: int) -> int:
    """The seed of one training image's augmentation in one epoch (`image`: its `image_key`): the same in any
    worker, after a resume, and in any split or fold the image trains in."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + image) % 2**63


def image_key(path: str) -> int:
    """An image's number for `augmentation_seed`, from its path rather than its place in a split: the folds of a
    depth study put an image at different places, and its augmented view of epoch e should not move with it (the
    feature store then shares the cached views of the folds, `finetune.features.store`)."""
    return int.from_bytes(hashlib.blake2b(str(path).encode(), digest_size=8).digest(), "little") % 2**62


class RandomSteps:
    """The random steps of a training transform (`finetune.data.transforms.train_transform`), to draw their parameters.

    Args:
        transform: the loader-side training transform; its RandomResizedCrop, RandomRotation and
            RandomHorizontalFlip steps are used as they are.
    """

    def __init__(self, transform: T.Compose) -> None:
        steps = transform.transforms
        self.crop = next(s for s in steps if isinstance(s, T.RandomResizedCrop))
        self.rotation = next((s for s in steps if isinstance(s, T.RandomRotation)), None)
        self.flip = next((s for s in steps if isinstance(s, T.RandomHorizontalFlip)), None)

    def draw(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The parameters the loader-side transform would draw for `image` under `seed`, as 6 integers:
        crop top, left, height, width (pixels of `image`), angle (micro-degrees), flip (0 or 1)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            box = self.crop.make_params([image])
            angle = self.rotation.make_params([image])["angle"] if self.rotation else 0.0
            flip = bool(torch.rand(1) < self.flip.p) if self.flip else False  # as RandomHorizontalFlip decides
        return torch.tensor(
            [box["top"], box["left"], box["height"], box["width"], round(angle * ANGLE_SCALE), int(flip)]
        )


class CanvasDataset(Dataset):
    """Training images for device-side augmentation: each decoded image on a canvas of one fixed size, its label,
    and its random parameters for the epoch.

    Indexed by `(index, epoch)` keys (`EpochShuffler(keyed=True)`); `keys`: each image's `image_key`. An image
    smaller than the canvas sits in its top-left corner, its last row and column repeated into the rest, so
    interpolation at its edges sees its own pixels; the crop box never leaves the image.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[int],
        steps: RandomSteps,
        seed: int,
        keys: Sequence[int],
    ) -> None:
        self.images, self.labels, self.steps, self.seed, self.keys = images, list(labels), steps, seed, list(keys)
        self.canvas = (max(t.shape[1] for t in images), max(t.shape[2] for t in images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image = self.images[index]
        params = self.steps.draw(image, augmentation_seed(self.seed, epoch, self.keys[index]))
        return on_canvas(image, self.canvas), self.labels[index], params


def on_canvas(image: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """`image` (C, h, w) in the top-left corner of a (C, *canvas) tensor, its edges repeated outwards."""
    height, width = image.shape[1:]
    if (height, width) == canvas:
        return image
    out = image.new_empty(image.shape[0], *canvas)
    out[:, :height, :width] = image
    out[:, :height, width:] = image[:, :, -1:]
    out[:, height:, :] = out[:, height - 1 : height, :]
    return out


class DeviceAugmentation:
    """Crop-resize, rotation, flip and normalisation of a whole batch, where the batch is (a GPU, or the CPU).

    Args:
        crop_size: side of the square the network sees.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        interpolation: "bilinear" or "bicubic" (the weights' resize interpolation; others fall back to bilinear).
        rotates: whether the training transform rotates (then the corners outside the rotated crop are black, as
            torchvision's RandomRotation leaves them).
    """

    def __init__(
        self,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        rotates: bool = True,
    ) -> None:
        self.crop_size = crop_size
        self.mean, self.std = list(mean), list(std)
        self.mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
        self.rotates = rotates

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to normalised float32, with the same torchvision kernels as the evaluation transform."""
        return F.normalize(F.to_dtype(images, torch.float32, scale=True), self.mean, self.std)

    def __call__(self, canvas: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augments a batch.

        Args:
            canvas: (B, C, H, W) uint8 images (`CanvasDataset`).
            params: (B, 6) integers from `RandomSteps.draw`.

        Returns:
            (B, C, crop_size, crop_size) float32, normalised.
        """
        batch, channels, height, width = canvas.shape
        size = (batch, channels, self.crop_size, self.crop_size)
        params = params.to(torch.float64)
        top, left, box_h, box_w, angle, flip = params.unbind(1)
        radians = angle / ANGLE_SCALE * (math.pi / 180)
        cos, sin = radians.cos(), radians.sin()
        sign = 1 - 2 * flip  # -1 flips: the loader flips last, so the inverse map flips first
        # Output pixel (normalised, -1..1) -> unflipped -> unrotated (torchvision rotates counterclockwise about
        # the centre) -> inside the crop box -> normalised canvas coordinates (align_corners=False throughout).
        rotation = torch.stack([torch.stack([sign * cos, -sin], 1), torch.stack([sign * sin, cos], 1)], 1)
        scale = torch.stack([box_w / width, box_h / height], 1).unsqueeze(2)
        offset = torch.stack([(2 * left + box_w) / width - 1, (2 * top + box_h) / height - 1], 1).unsqueeze(2)
        theta = torch.cat([rotation * scale, offset], 2).float()
        grid = nnF.affine_grid(theta, size, align_corners=False)
        images = nnF.grid_sample(canvas.float(), grid, mode=self.mode, padding_mode="border", align_corners=False)
        if self.mode == "bicubic":
            images = images.clamp_(0, 255)
        if self.rotates:
            # Where the unrotated point falls outside the crop, torchvision's rotation fills black. Its mask fades
            # over half a pixel either side of the crop's edge, and it applies to a sample that already faded into
            # its zero padding: the edge fades by the mask squared, here too.
            inside = nnF.affine_grid(
                torch.cat([rotation, torch.zeros_like(offset)], 2).float(), size, align_corners=False
            )
            fade = ((1 - inside.abs()) * (self.crop_size / 2) + 0.5).clamp_(0, 1)
            images = images * (fade[..., 0] * fade[..., 1]).square().unsqueeze(1)
        return F.normalize(images.div_(255), self.mean, self.std)
