"""bf16 against fp32 on the ELPV paper protocol: equal accuracy, measured (issue 21: within +-0.5 points).

    python bench/bf16_accuracy.py            # experiment=elpv_paper (3 seeds) twice: about 16 minutes on 2 cores
    python bench/bf16_accuracy.py --seeds 4,5,6,7,8   # more pairs: about 3.5 minutes a seed
    python bench/bf16_accuracy.py --smoke    # tiny generated images, 32 px, 1 epoch: that it runs (the suite)

Each side is the protocol as a user runs it, `python train.py experiment=elpv_paper` (a multirun over seeds 1, 2, 3,
each its own split, sharing the frozen part's features between them), once with `trainer.precision=32-true` and
once with `trainer.precision=bf16-mixed`, whose feature pass also runs in bf16 and keeps its cache in bf16. The
seeds pair the runs: the table gives each seed's test accuracy on both sides, then the mean paired difference
(bf16 - fp32, in points) with its 95% t-interval (`scipy.stats.ttest_rel`), and each side's wall time. The fp32
side runs first; the machine's drift between the sides shows in the speed-up, not in the accuracies.

The last line is `bf16_accuracy difference X ci LO HI speedup S`: points, the interval's ends, and fp32's wall time
over bf16's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_smoke_argument, machine, revision, smoke_images, today
from omegaconf import OmegaConf
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
SIDES = {"fp32": "32-true", "bf16": "bf16-mixed"}


def run_side(precision: str, sweep_dir: Path, overrides: list[str]) -> tuple[dict[int, dict], float]:
    """`python train.py experiment=elpv_paper trainer.precision=<precision> ...` as a subprocess: each seed's
    metrics.json, and the wall time of the whole multirun."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=elpv_paper",
        f"trainer.precision={precision}",
        f"hydra.sweep.dir={sweep_dir}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    by_seed = {}
    for job in sorted(path for path in sweep_dir.iterdir() if (path / "metrics.json").exists()):
        seed = OmegaConf.load(job / ".hydra" / "config.yaml").seed
        by_seed[int(seed)] = json.loads((job / "metrics.json").read_text())
    return by_seed, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    add_smoke_argument(parser)
    parser.add_argument("--override", action="append", default=[], help="a train.py override for both sides")
    parser.add_argument("--seeds", help="the seeds, comma-separated (default: the protocol's 1,2,3; --smoke: 1,2)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bf16_accuracy-"))
    try:
        # --smoke: two pairs, the fewest a t-interval takes.
        overrides = [f"seed={args.seeds or ('1,2' if args.smoke else '1,2,3')}", *args.override]
        if args.smoke:
            data = smoke_images(work / "data", per_class=20)
            overrides += [f"data.root={data}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0"]
            overrides += ["trainer.max_epochs=1"]
        results = {side: run_side(precision, work / side, overrides) for side, precision in SIDES.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (fp32, fp32_wall), (bf16, bf16_wall) = results["fp32"], results["bf16"]
    seeds = sorted(fp32.keys() & bf16.keys())
    if len(seeds) < 2:
        raise SystemExit(f"paired seeds: {seeds}; a t-interval needs at least 2")
    accuracies = {seed: (fp32[seed]["test/acc"], bf16[seed]["test/acc"]) for seed in seeds}
    differences = [100 * (b - a) for a, b in accuracies.values()]
    mean = sum(differences) / len(differences)
    interval = stats.ttest_rel([100 * b for _, b in accuracies.values()], [100 * a for a, _ in accuracies.values()])
    low, high = interval.confidence_interval(0.95)
    if math.isnan(low):  # every seed gave the same difference: no spread to estimate
        low = high = mean

    print(f"# python bench/bf16_accuracy.py {' '.join(sys.argv[1:])}")
    print(f"# {today()}; {machine(torch.device('cpu'))}; finetune {revision()}")
    print(f"# experiment=elpv_paper {' '.join(o for o in overrides if not o.startswith('data.root'))}")
    print("| seed | fp32 test/acc | bf16 test/acc | bf16 - fp32 (points) |\n|---|---|---|---|")
    for seed, (a, b) in accuracies.items():
        print(f"| {seed} | {a:.4f} | {b:.4f} | {100 * (b - a):+.2f} |")
    features = {bool(metrics.get("precision/feature_pass_bf16")) for metrics in bf16.values()}
    print(
        f"fp32: {len(fp32)} runs in {fp32_wall:.0f} s; bf16-mixed: {len(bf16)} runs in {bf16_wall:.0f} s "
        f"(feature cache in bf16: {'yes' if features == {True} else 'no' if features == {False} else 'some'})"
    )
    print(f"mean paired difference {mean:+.2f} points, 95% t-interval [{low:+.2f}, {high:+.2f}], {len(seeds)} seeds")
    print(f"bf16_accuracy difference {mean:.2f} ci {low:.2f} {high:.2f} speedup {fp32_wall / bf16_wall:.2f}")


if __name__ == "__main__":
    sys.exit(main())
