"""Every bench/*.py script runs: its `--smoke` mode (tiny generated images, seconds of work) exits 0 and ends with
its result line. What is not run rots: two benches crashed on main for weeks before this test.

A new bench is found by the glob; it needs a `--smoke` mode (bench/common.py: add_smoke_argument, smoke_images) and
its result line below.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
from conftest import REPO, run_script_in_process

NUMBER = r"[-+]?\d[\d.]*"
# The last line each bench prints: its headline (bench/RESULTS.md's table names them).
RESULT_LINES = {
    "bf16_accuracy.py": rf"bf16_accuracy difference {NUMBER} ci {NUMBER} {NUMBER} speedup {NUMBER}",
    "data_pipeline.py": rf"data_fraction {NUMBER} speedup {NUMBER}",
    "depth_cost.py": rf"mobilenet_v2 step time unfreeze=0/all = {NUMBER}.*",
    "elpv_compact.py": r"16 images from \S+ -> \S+: JPEG q92, .*",
    "feature_cache.py": rf"speedup {NUMBER} accuracy_delta {NUMBER}",
    "gpu.py": rf"cpu mobilenet_v2 unfreeze=all images_per_second {NUMBER} data_wait {NUMBER}",
    "parity.py": rf".*; ratio {NUMBER}",
    "step_overhead.py": rf"overhead {NUMBER} ms a step, ratio {NUMBER}",
    "step_ratio.py": rf"step_ratio {NUMBER}",
    "study_floor.py": rf"study_floor wall {NUMBER} floor {NUMBER} ratio {NUMBER}",
    "verdict_check.py": rf"verdict_check coverage {NUMBER} agreement {NUMBER} regret {NUMBER} repeats \d+",
}
# Smoke runs of a few seconds; the others are slow.
QUICK = {"elpv_compact.py"}
BENCHES = sorted(path.name for path in (REPO / "bench").glob("*.py") if path.name != "common.py")


@pytest.mark.parametrize(
    "script", [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in BENCHES]
)
def test_smoke_mode_runs(script, tmp_path):
    assert script in RESULT_LINES, f"bench/{script}: give it a --smoke mode and its result line in RESULT_LINES"
    # In this process, as `python bench/<script> --smoke` runs it (its __main__ block): a subprocess would add
    # about 6 s of imports to each.
    result = run_script_in_process(tmp_path, REPO / "bench" / script, "--smoke")
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    lines = result.stdout.strip().splitlines()
    assert lines and re.fullmatch(RESULT_LINES[script], lines[-1]), result.stdout[-3000:]


@pytest.mark.slow
def test_step_ratio_leaves_its_own_raw_step_out_of_the_fit(monkeypatch, capsys, tmp_path):
    """The bench times the raw step in `on_fit_end`, inside `trainer.fit`, so inside the run's time/fit_seconds: a raw
    step made 8 s slower shows as 8 s left out of the fit, not as 8 s before the fit loop (where, before, the raw
    step's 18.6 s made the fit look 0.58 of its step)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import step_ratio

    raw_step = step_ratio.FitTimer._raw_step

    def slow_raw_step(self, trainer, pl_module):
        time.sleep(8)
        return raw_step(self, trainer, pl_module)

    monkeypatch.setattr(step_ratio.FitTimer, "_raw_step", slow_raw_step)
    monkeypatch.setattr(sys, "argv", ["step_ratio.py", "--smoke"])
    step_ratio.main()
    printed = capsys.readouterr().out
    before_loop = float(re.search(r"\| before the fit loop [^|]*\| ([\d.]+) \|", printed).group(1))
    left_out = float(re.search(r"the raw step's own ([\d.]+) s", printed).group(1))
    assert left_out >= 8 and before_loop < 8, printed
    # The layout is the steps' (channels-last for a CNN on the CPU), not the loader's NCHW batches'.
    assert "channels_last True" in printed, printed
