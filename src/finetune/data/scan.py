"""The data scan: every image of a data set decoded once before training, to find the ones that cannot be used.

A real image folder holds truncated uploads, zero-byte files and text files with image extensions. Finding
them before training (not in a loader worker at epoch 7) lets the run skip them with a reason, or stop at once
with `data.strict=true`. The scan decodes each file fully (the only sure test), in parallel, and remembers its
verdict in the user's cache keyed by path, size and modification time, so a second run over the same folder
decodes only what changed. Nothing is written inside the data folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from finetune.data.images import load_rgb
from finetune.errors import UsageError

log = logging.getLogger(__name__)

# From this ratio of the largest to the smallest training class on, the log and the sweep report warn.
STRONG_IMBALANCE = 3.0


def skip_unreadable(images: Sequence[str], root: Path, cache_file: Path | None, strict: bool) -> dict[str, str]:
    """The unreadable images among `images` (under `root`): skipped, each logged once; with `strict`, an error."""
    bad = unreadable_images(images, cache_file)
    if bad and strict:
        path, reason = next(iter(bad.items()))
        raise UsageError(
            f"{len(bad)} unreadable image(s) under {root}, e.g. {path}: {reason}; fix or "
            "remove them, or leave out data.strict=true to skip them"
        )
    for path, reason in bad.items():
        log.warning("skipping %s: %s", path, reason)
    return bad


def unreadable_images(paths: Sequence[str], cache_file: Path | None, threads: int | None = None) -> dict[str, str]:
    """The images among `paths` that cannot be decoded, with the reason for each.

    Args:
        paths: image files.
        cache_file: where verdicts are remembered between runs (None: nowhere).
        threads: decoding threads (Pillow decodes outside the GIL, as for `finetune.data.image_cache`); None: one per
            CPU core.

    Returns:
        path -> reason, for each unreadable image, in the order of `paths`.
    """
    cached = _read_cache(cache_file)
    verdicts: dict[str, str | None] = {}
    to_check = []
    for path in paths:
        stamp = _stamp(path)
        entry = cached.get(path)
        if stamp is not None and entry is not None and entry[:2] == stamp:
            verdicts[path] = entry[2]
        else:
            to_check.append(path)
    if to_check:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            found = list(pool.map(why_unreadable, to_check))
        verdicts.update(zip(to_check, found, strict=True))
        _write_cache(cache_file, cached, verdicts)
    log.info(
        "data scan: %d image(s), %d decoded now, %d known from an earlier scan (%s)",
        len(paths),
        len(to_check),
        len(paths) - len(to_check),
        cache_file,
    )
    return {path: verdicts[path] for path in paths if verdicts[path] is not None}


def why_unreadable(path: str) -> str | None:
    """None if the image at `path` decodes to RGB, else the reason it does not (a short phrase)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        load_rgb(path)
    except Image.DecompressionBombError:
        return (
            f"too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's "
            "decompression-bomb limit): downscale it"
        )
    except UnidentifiedImageError:
        return "not an image (unknown format or damaged header)"
    except OSError as error:
        if "truncated" in str(error):
            return "truncated (image data ends early)"
        return f"cannot be read ({error.strerror or error})"
    except (ValueError, SyntaxError, IndexError, EOFError) as error:  # what Pillow's decoders raise on bad data
        return f"damaged image data ({type(error).__name__}: {error})"
    return None


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


def _write_cache(cache_file: Path | None, cached: dict[str, list], verdicts: dict[str, str | None]) -> None:
    if cache_file is None:
        return
    entries = dict(cached)
    for path, verdict in verdicts.items():
        stamp = _stamp(path)
        if stamp is not None:
            entries[path] = [*stamp, verdict]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entries))
        partial.replace(cache_file)  # atomic: runs sharing the cache never read half a file
    except OSError as error:
        log.info("data scan: could not remember the scan in %s (%s)", cache_file, error.strerror or error)
