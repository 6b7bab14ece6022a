r"""Every GPU measurement of issue 16 in one run (about 8 minutes on one H200): training images/s over the whole fit,
validation included, steady-state images/s, the fraction of the step the GPU waits on data, peak GPU memory, and
the wall time of a whole depth study (5 depths x 3 seeds).

Each cell is one real training run, `python train.py <overrides>` in a subprocess (start-up, image cache, feature
cache, validation, checkpoints and the final evaluation all as a user gets them), on ELPV at 224 px, bf16-mixed,
channels-last (`trainer=gpu`), random init (`model.weights=null`: torchvision's weights would need a download; the
step costs what a pretrained one does). A cell is `model:unfreeze:path:batch[:extra...]`:

- path `files`:    data.cache_images=false: loader workers decode, augment and normalise every file every epoch;
- path `cached`:   data.cache_images=true: decoded once into memory, augmented in the loader workers;
- path `device`:   data.cache_images=true data.augment_on=device: workers stack uint8 images, the GPU augments;
- path `features`: data.augment=false strategy.cache_features=true: the frozen part runs once (unfreeze=0 trains
                   the head on cached features);
- extras: `compile` (model.compile=true), `graphs` (model.compile=reduce-overhead: CUDA graphs), `fp32`
  (trainer.precision=32-true), `nchw` (model.channels_last=false), `wN` (data.num_workers=N), `nometrics` (a bench
  experiment, not a setting: the training steps skip the torchmetrics updates, whose argument checks and bincounts
  synchronise the GPU every step; shows what removing those syncs from `module.py` would gain).

A `StepTimer` callback (added with `+callbacks.gpu_timer=...`, so the run is otherwise untouched) records per step,
with CUDA events and no synchronisation inside the epoch: the **data wait** (GPU time from the end of the previous
step, or the epoch's start, to the start of this one: the loader, the copy to the GPU, device-side augmentation,
and any GPU idle while the host waits for them) and the **step** (forward, backward, optimizer). data_wait =
sum(wait) / sum(wait + step). It also takes the host's own wait for the loader, the validation and the rest of each
epoch (checkpoints, hooks), the peak GPU memory, and, at one step, how many GPU->host synchronisations the step
makes (`torch.cuda.set_sync_debug_mode`). The cells run in the order given (`--cells`; the default puts the
depth study, `study`: `-m unfreeze=0,1,2,4,all seed=0,1,2` in one process, or `experiment=depth_study` where conf/
has a sweep of that name, after the four main cells, and `model.compile` last): a `--budget-seconds` guard skips
what would not finish in time and says so, and stops a run that would overrun (a cut study is extrapolated from
its finished runs).

It prints a table (model, depth, data path, images/s, data-wait fraction, GPU memory, ...) and, last, a line
`gpu mobilenet_v2 unfreeze=all images_per_second X data_wait Y` (the fastest MobileNetV2 `unfreeze=all` cell;
`cpu ...` with --device cpu). The table, that line, all figures (JSON) and the runs' logs also go to --out
(default $OUT, else a temporary folder).

Preparation, on a machine with the project's virtual environment and `pip` (the device machine has PyTorch,
Lightning, timm, torchmetrics and psutil, but no hydra-core, omegaconf, antlr4 or elpv-dataset; the tree that
travels is limited to 64 MiB):

    python bench/elpv_compact.py                     # .elpv/elpv: the 2,624 ELPV images as grayscale JPEG q92, 36 MiB
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: a pure-Python wheel
    python bench/gpu.py --device cpu --tiny          # the same code path on the CPU (~8 min on 2 busy cores)
    python bench/gpu.py --smoke                      # one tiny cell through train.py on the CPU: the suite runs it

Then one device call, carry [".whl", ".elpv"], timeout_s 600 (the 480 s budget leaves two minutes spare):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi --query-gpu=name,memory.used,clocks.sm \
        --format=csv; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu.py --data-root .elpv/elpv \
        --budget-seconds 480 2>&1 | tee $OUT/gpu_console.txt

bench/RESULTS.md has it on one line (351 characters). `--tiny` on the CPU: 64 px, 1 epoch, 20 images a class,
4 cells and a 2-run study.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import add_smoke_argument, machine, revision, smoke_images, subset, today  # noqa: E402
from gpu_bench.cells import (  # noqa: E402
    DEFAULT_CELLS,
    MIN_CELL_S,
    MIN_COMPILE_S,
    MIN_STUDY_S,
    PATHS,
    STUDY_DEPTHS,
    STUDY_SEEDS,
    TINY_CELLS,
    Budget,
    Cell,
    measure_cell,
    measure_study,
    parse_cell,
)
from gpu_bench.report import fmt, rate, save, skipped_row, study_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a CPU dry run: 64 px, 1 epoch, 20 images a class, 4 small cells, a 2-run study",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="an image folder (default: .elpv/elpv from bench/elpv_compact.py, else the ELPV demo)",
    )
    parser.add_argument("--per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument(
        "--cells",
        default=None,
        help="comma-separated model:unfreeze:path:batch[:extra...] or "
        f"study, run in that order (default: {','.join(DEFAULT_CELLS)})",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each cell (default 10; --tiny 1)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --tiny 64")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-study", action="store_true", help="leave the depth study out")
    parser.add_argument(
        "--study-depths",
        default=None,
        help=f"default {STUDY_DEPTHS}; --tiny 0,all; given, it runs instead of experiment=depth_study",
    )
    parser.add_argument("--study-seeds", default=None, help=f"default {STUDY_SEEDS}; --tiny 0")
    parser.add_argument("--study-epochs", type=int, default=None, help="default 10; --tiny 1")
    parser.add_argument("--study-model", default="mobilenet_v2")
    parser.add_argument("--study-batch", type=int, default=None, help="default 128; --tiny 16")
    parser.add_argument("--study-path", default="device", choices=tuple(p for p in PATHS if p != "features"))
    parser.add_argument(
        "--study-explicit",
        action="store_true",
        help="run the explicit -m unfreeze=... seed=... sweep even where experiment=depth_study exists",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=480,
        help="stop starting cells, and stop a running one, so that all ends within this (default 480)",
    )
    parser.add_argument("--reserve", type=float, default=15, help="seconds kept for the report (default 15)")
    parser.add_argument(
        "--out", default=None, help="where the table, JSON and logs go (default $OUT, else a temporary folder)"
    )
    add_smoke_argument(parser)
    args = parser.parse_args()
    if args.smoke:  # one small cell through train.py on the CPU: --tiny, smaller
        args.device, args.tiny, args.no_study = "cpu", True, True
        args.cells, args.image_size = args.cells or "mobilenet_v2:all:device:8", args.image_size or 32
    # Depths or seeds given on the command line are a sweep of their own, not the experiment's.
    # --tiny keeps its 2-run study: the experiment's 25 runs are no dry run.
    args.study_explicit = (
        args.study_explicit or args.tiny or args.study_depths is not None or args.study_seeds is not None
    )
    tiny = args.tiny
    args.epochs = args.epochs or (1 if tiny else 10)
    args.image_size = args.image_size or (64 if tiny else 224)
    args.study_depths = args.study_depths or ("0,all" if tiny else STUDY_DEPTHS)
    args.study_seeds = args.study_seeds or ("0" if tiny else STUDY_SEEDS)
    args.study_epochs = args.study_epochs or (1 if tiny else 10)
    args.study_batch = args.study_batch or (16 if tiny else 128)
    per_class = args.per_class or (20 if tiny else None)
    specs = args.cells.split(",") if args.cells else TINY_CELLS if tiny else DEFAULT_CELLS
    items: list[Cell | str] = [
        s if s == "study" else parse_cell(s) for s in specs if not (s == "study" and args.no_study)
    ]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    budget = Budget(args.budget_seconds)

    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="finetune-gpu-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="finetune-gpu-bench-") as scratch:
        work = Path(scratch)
        (work / "logs").mkdir()
        if args.smoke:
            data_root = smoke_images(work / "smoke")
        else:
            data_root = Path(args.data_root).expanduser().resolve() if args.data_root else default_data_root()
        if per_class and not args.smoke:
            data_root = subset(data_root, work / "data", per_class)
        env = dict(os.environ)
        env.update(
            {
                # The callback's module (this file) for the runs; src/ where finetune is not installed (device machine).
                "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(REPO / "src"), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
                "HYDRA_FULL_ERROR": "1",  # a failed cell's log then ends with its traceback
                # The scan's verdicts are kept here: only the first run decodes every file to check it.
                "FINETUNE_CACHE": str(work / "cache"),
                "HF_HUB_OFFLINE": "1",
            }
        )
        header = [
            f"# {' '.join(['python', 'bench/gpu.py', *sys.argv[1:]])}",
            f"# {today()}; {machine(torch.device(device))}; finetune {revision()}; budget {args.budget_seconds:.0f} s",
            f"# data {data_root} ({f'first {per_class} a class' if per_class else 'all images'}), {args.image_size} "
            f"px, {args.epochs} epochs a cell, random init, "
            + ("bf16-mixed, channels-last (trainer=gpu)" if device == "cuda" else "fp32 (trainer=cpu)"),
        ]
        print("\n".join(header), flush=True)
        rows: list[dict] = []
        for item in items:
            name = "study" if item == "study" else item.spec
            compiles = item != "study" and bool({"compile", "graphs"} & set(item.extras))
            needed = MIN_STUDY_S if item == "study" else MIN_COMPILE_S if compiles else MIN_CELL_S
            if tiny:
                needed = 5
            if budget.left() - args.reserve < needed:
                print(
                    f"skipped {name}: {budget.left():.0f} s of the budget left, it needs about {needed} s", flush=True
                )
                rows.append(skipped_row(item, args))
                continue
            if item == "study":
                row = measure_study(args, data_root, device, work, env, budget)
                print(study_line(row), flush=True)
            else:
                row = measure_cell(item, args, data_root, device, work, env, budget)
                print(
                    f"{name}: {row['status']}, {rate(row.get('images_per_s'))} images/s over the fit, data "
                    f"wait {fmt(row.get('data_wait'), 3)}, {fmt(row['wall_s'])} s wall "
                    f"({budget.left():.0f} s of the budget left)",
                    flush=True,
                )
            rows.append(row)
            save(out, work, header, rows, device)  # after every cell: a run stopped from outside keeps what it has
    report = save(out, None, header, rows, device)
    print("\n" + "\n".join(report[len(header) + 1 :]), flush=True)


def default_data_root() -> Path:
    compact = REPO / ".elpv" / "elpv"
    if compact.is_dir():
        return compact
    from finetune.data.demo import demo_root

    return demo_root("elpv")


if __name__ == "__main__":
    main()
