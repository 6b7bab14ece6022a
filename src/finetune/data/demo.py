"""Offline demo data: the ELPV solar-cell images laid out as an ImageFolder tree.

The images come from the ``elpv-dataset`` package on PyPI (2,624 grayscale 300x300 electroluminescence images of
solar cells, each labelled with a defect probability in {0, 1/3, 2/3, 1}). :func:`demo_root` copies them once into a
per-user cache as ``<root>/<class>/<file>.png`` so that any ImageFolder reader can train on them without a download.

The data set is licensed CC BY-NC-SA 4.0 (non-commercial use only); a ``README.txt`` with licence and citations
(``elpv_readme.txt``) is written next to the class folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module, metadata
from pathlib import Path

from finetune.data.partial_folders import make_partial, remove_abandoned_partials
from finetune.errors import UsageError

__all__ = [
    "DEMO_NAMES",
    "ELPV_LICENSE",
    "ELPV_SOURCE_URL",
    "README_NAME",
    "default_cache_dir",
    "demo_root",
]

logger = logging.getLogger(__name__)

ELPV_LICENSE = "CC BY-NC-SA 4.0"
ELPV_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
ELPV_SOURCE_URL = "https://github.com/zae-bayern/elpv-dataset"
README_NAME = "README.txt"

# Written last, inside the temporary folder, just before it is renamed into place: its presence is what tells later
# calls that the folder is complete.
_MARKER_NAME = ".complete.json"

_INSTALL_HINT = "pip install elpv-dataset"


@dataclass(frozen=True)
class _Demo:
    description: str
    classes: tuple[str, ...]
    classify: Callable[[float], str]


def _classify_elpv(probability: float) -> str:
    # Deitsch et al. 2019 treat cells with defect probability >= 0.5 as defective.
    return "defective" if probability >= 0.5 else "functional"


def _classify_elpv4(probability: float) -> str:
    level = round(probability * 3)
    if level not in (0, 1, 2, 3) or abs(probability * 3 - level) > 1e-6:
        raise ValueError(f"ELPV defect probability {probability!r} is not one of 0, 1/3, 2/3, 1")
    return f"p{round(level * 100 / 3):03d}"


_DEMOS: dict[str, _Demo] = {
    "elpv": _Demo(
        description="2 classes: functional (defect probability < 0.5), defective (>= 0.5)",
        classes=("functional", "defective"),
        classify=_classify_elpv,
    ),
    "elpv4": _Demo(
        description="4 classes named by defect probability: p000, p033, p067, p100",
        classes=("p000", "p033", "p067", "p100"),
        classify=_classify_elpv4,
    ),
}

DEMO_NAMES: tuple[str, ...] = tuple(_DEMOS)


@dataclass(frozen=True)
class _Label:
    path: str
    probability: float
    module_type: str


def default_cache_dir() -> Path:
    """Return the folder under which demo data sets are cached.

    The first of these that is set wins: ``$FINETUNE_CACHE``, ``$XDG_CACHE_HOME/finetune``, ``~/.cache/finetune``. A
    relative ``XDG_CACHE_HOME`` is ignored, as the XDG base-directory spec requires.

    Returns:
        The cache folder (not created by this function).
    """
    explicit = os.environ.get("FINETUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "finetune"
    return Path.home() / ".cache" / "finetune"


def demo_root(name: str = "elpv", cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the ImageFolder root of a demo data set, materialising it on first use.

    The first call copies the 2,624 ELPV images from the installed ``elpv-dataset`` package into
    ``<cache_dir>/datasets/<name>/<class>/`` (a few seconds); later calls only check that the folder is complete. The
    copy is built in a temporary sibling folder and renamed into place when complete, so an interrupted run never
    leaves a folder that looks finished, and concurrent callers in several processes all end up with one intact copy.
    Once materialised, the folder no longer needs the package.

    Demo names:

    * ``"elpv"``: classes ``functional`` (defect probability < 0.5) and ``defective`` (>= 0.5), as in Deitsch et al.
      2019; 1,803 / 821 images.
    * ``"elpv4"``: classes ``p000``, ``p033``, ``p067``, ``p100``, one per annotated defect probability;
      1,508 / 295 / 106 / 715 images.

    The root also holds ``README.txt`` (licence and citations) and a hidden marker file; only the sub-folders are
    classes.

    Args:
        name: Which demo data set, one of :data:`DEMO_NAMES`.
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        Path of the data set root, ready for an ImageFolder reader.

    Raises:
        ValueError: If ``name`` is not a known demo data set.
        UsageError: If the data set must be materialised and the ``elpv-dataset`` package is not installed.
        RuntimeError: If the target folder exists but was not made by this function (and is not empty).
    """
    if name not in _DEMOS:
        raise ValueError(f"Unknown demo data set {name!r}; valid names: {', '.join(DEMO_NAMES)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / "datasets" / name
    if _is_complete(root):
        return root

    data_dir = _elpv_data_dir()
    if root.exists():
        _clear_foreign_root(root)
        if _is_complete(root):
            return root
    _materialise(name, _DEMOS[name], root, data_dir)
    return root


def _is_complete(root: Path) -> bool:
    return (root / _MARKER_NAME).is_file()


def _clear_foreign_root(root: Path) -> None:
    # Our own folders only ever appear complete (atomic rename): an incomplete one is someone else's; only an empty
    # one is harmless.
    try:
        root.rmdir()
    except OSError as exc:
        if _is_complete(root):  # another process finished meanwhile
            return
        raise RuntimeError(
            f"{root} exists but is not a complete demo data set (no {_MARKER_NAME}); delete it and try again"
        ) from exc


def _elpv_data_dir() -> Path:
    try:
        package = import_module("elpv_dataset")
    except ImportError as exc:
        # A dependency of finetune, so missing means a broken install: one line saying how to mend it.
        raise UsageError(
            f"the ELPV demo data set needs the elpv-dataset package, which is not installed "
            f"({exc}): {_INSTALL_HINT}, or train on your own images with data=folder "
            "data.root=<folder>"
        ) from exc
    return Path(package.__file__).resolve().parent / "data"


def _elpv_version() -> str:
    try:
        return metadata.version("elpv-dataset")
    except metadata.PackageNotFoundError:
        return "unknown version"


def _read_labels(labels_csv: Path) -> list[_Label]:
    """Parse ``labels.csv`` the way ``elpv_dataset.utils.load_dataset`` does.

    That function uses ``numpy.genfromtxt`` defaults: columns separated by any
    whitespace, ``#`` starts a comment, blank lines are skipped.
    """
    labels = []
    with open(labels_csv, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{labels_csv}:{line_no}: expected 3 columns (path, probability, type), got {len(fields)}"
                )
            path, probability, module_type = fields
            labels.append(_Label(path, float(probability), module_type))
    return labels


def _copy_file(src: Path, dst: Path) -> None:
    # A real copy, not a link: the cache must survive the package being uninstalled or upgraded, and edits to the
    # cached files must never write through into site-packages.
    shutil.copyfile(src, dst)


def _plan(demo: _Demo, labels: Sequence[_Label], data_dir: Path) -> list[tuple[Path, str, str]]:
    plan = []
    seen: set[str] = set()
    for label in labels:
        file_name = Path(label.path).name
        # All classes share one file-name space: an image keeps a unique name even when moved between class folders.
        if file_name in seen:
            raise ValueError(f"Duplicate image file name {file_name!r} in the ELPV labels")
        seen.add(file_name)
        plan.append((data_dir / label.path, demo.classify(label.probability), file_name))
    return plan


def _materialise(name: str, demo: _Demo, root: Path, data_dir: Path) -> None:
    plan = _plan(demo, _read_labels(data_dir / "labels.csv"), data_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(root.parent)

    logger.info(
        "Materialising demo data set %r (ELPV solar cells, %d images, %s) into %s; "
        "licence %s, non-commercial use only, source %s",
        name,
        len(plan),
        demo.description,
        root,
        ELPV_LICENSE,
        ELPV_SOURCE_URL,
    )
    start = time.perf_counter()
    partial, lock_fd = make_partial(root)
    try:
        for class_name in demo.classes:
            (partial / class_name).mkdir()
        for src, class_name, file_name in plan:
            _copy_file(src, partial / class_name / file_name)
        counts = Counter(class_name for _, class_name, _ in plan)
        _write_readme(partial / README_NAME, name, demo, counts)
        _write_marker(partial / _MARKER_NAME, name, demo, counts)
        try:
            os.rename(partial, root)
        except OSError:
            # POSIX refuses to rename onto a non-empty folder, Windows onto any: someone else got there first.
            if not _is_complete(root):
                raise
            logger.debug("Demo data set %r was completed concurrently; discarding our copy", name)
        else:
            logger.debug("Materialised %s in %.1f s", root, time.perf_counter() - start)
    finally:
        # Also on KeyboardInterrupt: never leave a partial copy behind.
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)


def _write_readme(path: Path, name: str, demo: _Demo, counts: Counter[str]) -> None:
    class_lines = "\n".join(f"  {cls + '/':<12} {counts[cls]:>5} images" for cls in demo.classes)
    template = (Path(__file__).parent / "elpv_readme.txt").read_text(encoding="utf-8")
    text = template.format(
        name=repr(name),
        description=demo.description,
        class_lines=class_lines,
        total=sum(counts.values()),
        source_url=ELPV_SOURCE_URL,
        version=_elpv_version(),
        license=ELPV_LICENSE,
        license_url=ELPV_LICENSE_URL,
    )
    path.write_text(text, encoding="utf-8")


def _write_marker(path: Path, name: str, demo: _Demo, counts: Counter[str]) -> None:
    record = {
        "name": name,
        "classes": {cls: counts[cls] for cls in demo.classes},
        "total": sum(counts.values()),
        "source": f"elpv-dataset {_elpv_version()}",
        "license": ELPV_LICENSE,
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
