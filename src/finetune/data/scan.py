"""The data scan: every image of a data set decoded once before training, to find the ones that cannot be used.

A real image folder holds truncated uploads, zero-byte files and text files with image extensions. Finding
them before training (not in a loader worker at epoch 7) lets the run skip them with a reason, or stop at once
with `data.strict=true`. The scan decodes each file fully (the only sure test), in parallel, and remembers its
verdict in the user's cache keyed by path, size and modification time, so a second run over the same folder
decodes only what changed. Nothing is written inside the data folder.

Where asked, the scan also takes a perceptual hash of each decoded image (`imagehash.phash`), remembered with the
verdict, so near-duplicates (the same picture resized or re-encoded) can be found without decoding anything twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.images import load_rgb
from finetune.errors import UsageError

log = logging.getLogger(__name__)

# From this ratio of the largest to the smallest training class on, the log and the sweep report warn.
STRONG_IMBALANCE = 3.0
# 16x16 DCT bits (256): the 8x8 default calls distinct but alike images equal (neighbouring solar cells of ELPV
# hash identically), while a resized or JPEG-recompressed copy stays within 6 bits of its original at 16x16.
HASH_SIZE = 16


def skip_unreadable(
    images: Sequence[str], root: Path, cache_file: Path | None, strict: bool, hashes: bool = False
) -> tuple[dict[str, str], dict[str, str]]:
    """The unreadable images among `images` (under `root`): skipped, each logged once, or with `strict` an error;
    and with `hashes` the perceptual hash of every other image (`scan_images`)."""
    bad, image_hashes = scan_images(images, cache_file, hashes=hashes)
    if bad and strict:
        path, reason = next(iter(bad.items()))
        raise UsageError(
            f"{len(bad)} unreadable image(s) under {root}, e.g. {path}: {reason}; fix or "
            "remove them, or leave out data.strict=true to skip them"
        )
    for path, reason in bad.items():
        log.warning("skipping %s: %s", path, reason)
    return bad, image_hashes


def unreadable_images(paths: Sequence[str], cache_file: Path | None, threads: int | None = None) -> dict[str, str]:
    """The images among `paths` that cannot be decoded, with the reason for each (`scan_images` without hashes)."""
    return scan_images(paths, cache_file, threads)[0]


def scan_images(
    paths: Sequence[str], cache_file: Path | None, threads: int | None = None, hashes: bool = False
) -> tuple[dict[str, str], dict[str, str]]:
    """Decodes every image once: which cannot be decoded, and (with `hashes`) the perceptual hash of the others.

    Args:
        paths: image files.
        cache_file: where verdicts and hashes are remembered between runs (None: nowhere).
        threads: decoding threads (Pillow decodes outside the GIL, as for `finetune.data.image_cache`); None: one per
            CPU core.
        hashes: also hash each readable image (`HASH_SIZE`), for `near_duplicates`.

    Returns:
        path -> reason for each unreadable image, and path -> hash (hex) for each readable one (empty without
        `hashes`), both in the order of `paths`.
    """
    cached = _read_cache(cache_file)
    found: dict[str, tuple[str | None, str | None]] = {}
    to_check = []
    for path in paths:
        stamp = _stamp(path)
        entry = cached.get(path)
        # An entry from a scan without hashes (or an older one) lacks the hash: that image is decoded again.
        if stamp is not None and entry is not None and entry[:2] == stamp:
            verdict, digest = entry[2], entry[3] if len(entry) > 3 else None
            if not hashes or verdict is not None or digest is not None:
                found[path] = verdict, digest
                continue
        to_check.append(path)
    if to_check:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            inspected = list(pool.map(lambda path: _inspect(path, hashes), to_check))
        found.update(zip(to_check, inspected, strict=True))
        _write_cache(cache_file, cached, {path: found[path] for path in to_check})
    log.info(
        "data scan: %d image(s), %d decoded now, %d known from an earlier scan (%s)",
        len(paths),
        len(to_check),
        len(paths) - len(to_check),
        cache_file,
    )
    unreadable = {path: found[path][0] for path in paths if found[path][0] is not None}
    digests = {path: found[path][1] for path in paths if hashes and found[path][0] is None}
    return unreadable, digests


def near_duplicates(hashes: dict[str, str], max_distance: int) -> list[tuple[str, str, int]]:
    """The pairs of images whose perceptual hashes differ in at most `max_distance` bits.

    Every pair is compared (a matrix product of +-1 bit vectors, a block of rows at a time): a few seconds for
    tens of thousands of images.

    Returns:
        (path_a, path_b, distance) with path_a before path_b in the order of `hashes`, by path_a then path_b.
    """
    paths = list(hashes)
    if len(paths) < 2:
        return []
    bits = np.unpackbits(np.array([np.frombuffer(bytes.fromhex(hashes[p]), np.uint8) for p in paths]), axis=1)
    signs = bits.astype(np.float32) * 2 - 1
    width = signs.shape[1]
    pairs = []
    for start in range(0, len(paths), 1024):
        # Agreeing bits add 1 and differing ones -1: distance = (width - dot) / 2, exact in float32.
        distance = np.rint((width - signs[start : start + 1024] @ signs.T) / 2).astype(int)
        for row, column in zip(*np.nonzero(distance <= max_distance), strict=True):
            if column > start + row:
                pairs.append((paths[start + row], paths[column], int(distance[row, column])))
    return pairs


def _inspect(path: str, hashes: bool) -> tuple[str | None, str | None]:
    """The image's verdict (`why_unreadable`) and, if asked and readable, its perceptual hash: one decoding."""
    image, reason = _decode(path)
    if image is None or not hashes:
        return reason, None
    return None, str(imagehash.phash(image, hash_size=HASH_SIZE))


def why_unreadable(path: str) -> str | None:
    """None if the image at `path` decodes to RGB, else the reason it does not (a short phrase)."""
    return _decode(path)[1]


def _decode(path: str) -> tuple[Image.Image | None, str | None]:
    """The image decoded to RGB, or None and the reason it cannot be."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        return load_rgb(path), None
    except Image.DecompressionBombError:
        return None, (
            f"too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's "
            "decompression-bomb limit): downscale it"
        )
    except UnidentifiedImageError:
        return None, "not an image (unknown format or damaged header)"
    except OSError as error:
        if "truncated" in str(error):
            return None, "truncated (image data ends early)"
        return None, f"cannot be read ({error.strerror or error})"
    except (ValueError, SyntaxError, IndexError, EOFError) as error:  # what Pillow's decoders raise on bad data
        return None, f"damaged image data ({type(error).__name__}: {error})"


def scan_cache_file(cache_dir: Path, root: Path) -> Path:
    """Where the scan of the data folder `root` is remembered."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "scans" / f"{digest}.json"


def _stamp(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache_file: Path | None) -> dict[str, list]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a rescan


def _write_cache(
    cache_file: Path | None, cached: dict[str, list], found: dict[str, tuple[str | None, str | None]]
) -> None:
    if cache_file is None:
        return
    entries = dict(cached)
    for path, (verdict, digest) in found.items():
        stamp = _stamp(path)
        if stamp is not None:
            entries[path] = [*stamp, verdict, digest]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entries))
        partial.replace(cache_file)  # atomic: runs sharing the cache never read half a file
    except OSError as error:
        log.info("data scan: could not remember the scan in %s (%s)", cache_file, error.strerror or error)
