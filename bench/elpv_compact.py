"""A compact copy of the ELPV demo data set, small enough to travel to a machine without the elpv-dataset package.

The package's 2,624 grayscale 300x300 PNGs take 86 MiB, over the 64 MiB a device call may carry. Re-encoded as
grayscale JPEG at quality 92 (the H100 study in bench/RESULTS.md used the same) they take about 36 MB, in the same
ImageFolder layout and file stems, so `data.root=<copy>` gives the same stratified split as the demo:

    python bench/elpv_compact.py                   # writes .elpv/elpv/{functional,defective}/*.jpg (git-ignored)
    python bench/elpv_compact.py --quality 95      # ~49 MB, closer to the PNGs
    python train.py data.root=.elpv/elpv ...        # on the other machine
    python bench/elpv_compact.py --smoke           # tiny generated images, in a temporary folder: that it runs

JPEG is lossy: pixels differ from the PNGs by a few grey levels, so accuracy figures from the copy are close to,
not identical with, the demo's; decoding a JPEG also costs less than a PNG of the same image. The licence file
(CC BY-NC-SA 4.0, non-commercial use only) is copied along.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_smoke_argument, smoke_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def compact_copy(source: Path, target: Path, quality: int) -> tuple[int, int]:
    """Writes every class folder's images under `source` as grayscale JPEG under `target`; (images, bytes)."""
    jobs = []
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        (target / class_dir.name).mkdir(parents=True)
        jobs += [
            (image, target / class_dir.name / f"{image.stem}.jpg")
            for image in sorted(class_dir.iterdir())
            if image.is_file() and not image.name.startswith(".")
        ]

    def convert(job: tuple[Path, Path]) -> int:
        source_file, target_file = job
        with Image.open(source_file) as image:
            image.convert("L").save(target_file, "JPEG", quality=quality)
        return target_file.stat().st_size

    with ThreadPoolExecutor() as pool:
        sizes = list(pool.map(convert, jobs))
    readme = source / "README.txt"
    if readme.is_file():
        shutil.copyfile(readme, target / "README.txt")
    return len(sizes), sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--source",
        default=None,
        help="an ImageFolder root (default: the ELPV demo, materialised from the elpv-dataset package)",
    )
    parser.add_argument("--target", default=str(REPO / ".elpv" / "elpv"), help="default: .elpv/elpv in the repo")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    parser.add_argument("--force", action="store_true", help="replace an existing target")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if args.smoke:  # tiny generated images into a temporary folder: the repo's .elpv/ stays as it is
        scratch = Path(tempfile.mkdtemp(prefix="finetune-elpv-compact-"))
        args.source, args.target = str(smoke_images(scratch / "source")), str(scratch / "target")
    target = Path(args.target).expanduser()
    if target.exists():
        if not args.force:
            sys.exit(f"{target} exists; --force replaces it")
        shutil.rmtree(target)
    if args.source:
        source = Path(args.source).expanduser()
    else:
        from finetune.data.demo import demo_root

        source = demo_root("elpv")
    started = time.perf_counter()
    count, size = compact_copy(source, target, args.quality)
    print(
        f"{count} images from {source} -> {target}: JPEG q{args.quality}, {size / 2**20:.1f} MiB, "
        f"{time.perf_counter() - started:.1f} s"
    )
    if args.smoke:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
