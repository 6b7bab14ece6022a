"""The report of a sweep: `python -m finetune.report sweep_dir=multirun/<date>/<time>` (default: the newest sweep).

A sweep is what `python train.py -m ...` writes: one folder per job (`0/`, `1/`, ... or, for
`experiment=depth_study`, `unfreeze-2_fold-3/`, ...), each with `.hydra/config.yaml`, `train.log`, per-epoch
curves (`tensorboard/` or `csv/metrics.csv`) and, once it has finished, `metrics.json` (plus `convergence.json`,
`test_predictions.csv` and `test_latency.json` where those callbacks ran). `finetune.study.sweep` reads them: every
job with its status (done, failed, incomplete), configuration and final metrics; runs whose configurations differ
only in `seed` or `data.fold` are one point. `finetune.study.analysis` turns the points into intervals and paired
comparisons, `finetune.study.verdict` into words; `finetune.study.tables`, `finetune.study.plots` and
`finetune.study.html` write `report.html`, `report.md`, the CSV tables and the PNG plots into the sweep folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from finetune import apps
from finetune.errors import UsageError
from finetune.study.html import write_html
from finetune.study.plots import PLOTS, write_plots
from finetune.study.runs import DONE, FAILED, INCOMPLETE, RunRow, find_runs, newest_sweep, read_curve, read_run
from finetune.study.sweep import PointRow, Report, build_report
from finetune.study.tables import write_tables

__all__ = [
    "DONE",
    "FAILED",
    "INCOMPLETE",
    "PLOTS",
    "PointRow",
    "Report",
    "RunRow",
    "build_report",
    "find_runs",
    "main",
    "newest_sweep",
    "read_curve",
    "read_run",
    "write_report",
]


def write_report(report: Report, sweep_dir: Path, plots: bool = True) -> list[Path]:
    """Writes report.html, report.md, report.csv, report_by_point.csv and (with plots) the PNGs into sweep_dir.

    Returns:
        The paths written.

    Raises:
        UsageError: sweep_dir cannot be written.
    """
    sweep_dir = Path(sweep_dir)
    try:
        written = write_tables(report, sweep_dir)
        figures = write_plots(report, sweep_dir) if plots else []
        markdown = sweep_dir / "report.md"
        images = "".join(f"\n\n![{path.stem}]({path.name})" for path in figures)
        markdown.write_text(f"# Sweep report: {report.sweep_dir}\n\n{report.to_markdown()}{images}\n")
        written += [markdown, write_html(report, sweep_dir / "report.html", figures), *figures]
    except OSError as error:
        raise UsageError(f"cannot write the report into {sweep_dir}: {error.strerror or error}") from error
    return written


USAGE = """python -m finetune.report [sweep_dir=<folder>] [plots=false]

The verdict, tables and plots of a sweep (python train.py -m ..., e.g. experiment=depth_study), written into its
folder as report.html (one self-contained page: open it in a browser), report.md, report.csv, report_by_point.csv,
report_study.csv, report_comparisons.csv and PNG plots; the Markdown is printed too.

  sweep_dir   a sweep folder (multirun/<date>/<time>) or one run's folder; default: the newest sweep under multirun/
  plots       false: the tables only
"""


@dataclass
class ReportOptions:
    """The options of `python -m finetune.report` (see USAGE)."""

    sweep_dir: str | None = None
    plots: bool = True


@apps.command("report", ReportOptions, USAGE)
def main(options: ReportOptions) -> None:
    """`python -m finetune.report [sweep_dir=...] [plots=false]`: prints the report and writes it into the sweep
    folder (`main(argv)` returns the exit code)."""
    sweep_dir = Path(options.sweep_dir).expanduser() if options.sweep_dir else None
    if sweep_dir is None:
        sweep_dir = newest_sweep()
        print(f"the newest sweep under multirun/: {sweep_dir}")
    report = build_report(sweep_dir)
    written = write_report(report, sweep_dir, plots=options.plots)
    print(report.to_markdown())
    print("\nwritten: " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    sys.exit(main())
