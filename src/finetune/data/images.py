"""Loading image files as 8-bit RGB, whatever their on-disk encoding.

Pillow hands back images in many modes (bilevel, palette, 16-bit, float, CMYK,
with or without alpha) and its plain ``convert("RGB")`` is wrong for several of
them: 16-bit and 32-bit integer images are clipped at 255 instead of scaled,
and transparent pixels turn black. :func:`load_rgb` normalises all of that so
that a model sees the picture a person would see in an image viewer.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_rgb"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

# Modes whose alpha (or tRNS transparency) must be flattened onto a background.
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})

_BACKGROUND = (255, 255, 255)


def is_image_file(name: str) -> bool:
    """Tell whether a file name looks like an image that :func:`load_rgb` accepts.

    The extension is matched case-insensitively against :data:`IMAGE_EXTENSIONS`.
    Hidden files are rejected: besides ``.DS_Store`` this catches the macOS
    AppleDouble companions (``._photo.jpg``) that hold resource-fork metadata,
    not pixels, and that appear when folders are copied from a Mac.

    Args:
        name: A file name or a path; only its last component is looked at.

    Returns:
        True if the name has an accepted image extension and is not hidden.
    """
    base = os.path.basename(os.fspath(name))
    if not base or base.startswith("."):
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as an 8-bit RGB image.

    The conversion is the one a viewer would show:

    * the EXIF orientation tag is applied, so portrait phone photos are upright;
    * grayscale (``L``), bilevel (``1``), CMYK, YCbCr etc. become RGB;
    * 16-bit images (``I;16``, ``I;16B``) are scaled from 0..65535 to 0..255;
      32-bit integer (``I``) images are scaled according to the range their
      values occupy (0..255 as is, 0..65535 as 16-bit, anything else min-max);
    * float (``F``) images in 0..1 are multiplied by 255, in 0..255 kept, and
      otherwise min-max stretched;
    * alpha channels and transparent palette entries are composited onto a
      white background, so transparent pixels become white rather than black.

    Only the first frame of animated or multi-page files is returned. The file
    is fully read and closed before returning.

    Args:
        path: Path of the image file.

    Returns:
        A new, file-independent ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        PIL.UnidentifiedImageError: If the file is not an image Pillow can read.
        OSError: If the image data are truncated or otherwise undecodable.
    """
    with Image.open(path) as image:
        image.load()
        image = _apply_exif_orientation(image, path)
        return _to_rgb(image)


def _apply_exif_orientation(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception as exc:
        # Malformed EXIF blocks are common in the wild (edited or re-saved
        # photos) and must not make an otherwise decodable image unusable.
        logger.debug("Ignoring unreadable EXIF orientation in %s: %s", path, exc)
        return image
    return transposed if transposed is not None else image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _high_depth_to_l(image)
        return gray.convert("RGB")
    if _has_transparency(image):
        return _flatten_alpha(image.convert("RGBA"))
    # convert() always returns a new image (a copy for RGB), so the result
    # never refers to the file the caller's context manager closes.
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    # Same test as Pillow's ``has_transparency_data``, which is a method in some
    # Pillow versions and a property in others, and absent before 10.1.
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to mode ``L``."""
    # Pillow's own I;16/I/F -> L conversion clips at 255 instead of scaling,
    # which turns every 16-bit image into an almost all-white picture.
    values = np.asarray(image)
    transparent = _transparent_mask(image, values)
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    data[~finite] = 0.0

    if image.mode.startswith("I;16"):
        low, full_scale = 0.0, 65535.0
    else:
        low, full_scale = _guess_range(data[finite], is_float=image.mode == "F")

    span = full_scale - low
    # A constant image (span 0) has no contrast to preserve; map it to black.
    scaled = (data - low) * (255.0 / span) if span > 0 else np.zeros_like(data)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if transparent is not None:
        out[transparent] = 255  # tRNS transparency is binary: pixel is background
    return Image.fromarray(out)


def _guess_range(values: np.ndarray, *, is_float: bool) -> tuple[float, float]:
    """Pick the (low, full-scale) pair that maps a high-depth image to 8 bits.

    Mode ``I`` and ``F`` carry no bit depth, so we infer the nominal range
    from the values: prefer a standard full-scale the data fit in, so that a
    dark image stays dark, and only min-max stretch data outside all of them.
    """
    if values.size == 0:
        return 0.0, 255.0
    lo, hi = float(values.min()), float(values.max())
    candidates = ([1.0] if is_float else []) + [255.0, 65535.0]
    if lo >= 0:
        for full_scale in candidates:
            if hi <= full_scale:
                return 0.0, full_scale
    return lo, hi


def _transparent_mask(image: Image.Image, values: np.ndarray) -> np.ndarray | None:
    transparency = image.info.get("transparency")
    if isinstance(transparency, int) and not isinstance(transparency, bool):
        return values == transparency
    return None
