"""report.html: the report as one self-contained page (plots embedded as base64 PNGs; no server, no network).

The verdict comes first, then the points with their intervals and costs, the paired comparisons, what is missing,
the plots, and every run.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from finetune.study.tables import _POINT_COLUMNS, _RUN_COLUMNS, COMPARISON_COLUMNS, STUDY_COLUMNS, _cell

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.where { color: #666; font-size: 0.9em; word-break: break-all; }
.verdict { background: #eef6ee; border-left: 6px solid #2e7d32; padding: 0.8em 1.2em; font-size: 1.1em; }
.verdict.undecided { background: #fff6e5; border-left-color: #ef8f00; }
.verdict p { margin: 0.4em 0; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f4f4f4; white-space: normal; vertical-align: bottom; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.recommended td { background: #eef6ee; font-weight: 600; }
.note { color: #555; font-size: 0.9em; } .missing { color: #a33; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.runs { overflow-x: auto; }
"""


def html_table(columns, items: list, highlight=None) -> str:
    """A table of the given columns (the same as the Markdown ones); rows for which highlight(item) is true are
    marked as recommended."""
    columns = [c for c in columns if c.in_text and not (c.optional and all(c.value(i) in (None, "") for i in items))]
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    rows = []
    for item in items:
        marked = ' class="recommended"' if highlight is not None and highlight(item) else ""
        cells = "".join(f"<td{' class=num' if c.numeric else ''}>{html.escape(_cell(c, item))}</td>" for c in columns)
        rows.append(f"<tr{marked}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _study_section(study) -> list[str]:
    parts = []
    undecided = any(group.undecided for group in study.groups)
    paragraphs = "".join(f"<p>{html.escape(group.verdict)}</p>" for group in study.groups)
    parts.append(f'<h2>Verdict</h2><div class="verdict{" undecided" if undecided else ""}">{paragraphs}</div>')
    for group in study.groups:
        title = f" ({html.escape(group.title)})" if len(study.groups) > 1 else ""
        parts.append(
            f"<h2>Points{title}</h2><div class=runs>"
            + html_table(STUDY_COLUMNS, group.points, lambda s, g=group: s is g.recommended)
            + "</div>"
        )
        comparisons = group.comparisons
        if comparisons:
            parts.append(f"<h2>Paired comparisons{title}</h2>" + html_table(COMPARISON_COLUMNS, comparisons))
    unit = "folds" if study.design == "folds" else "test images"
    parts.append(
        f'<p class="note">Statistics: {html.escape(study.method)}. Accuracy and macro-F1 are in percent, '
        f"means over {unit}, with 95% intervals; n is the number of {unit}. Train s: mean fit time per "
        "run; inference ms/img: the whole network in eval mode (the same network at every depth). "
        "p (Holm): the p-value adjusted over the table's comparisons; significant means below 0.05. "
        "Converged: runs that stopped because the validation loss stopped improving, not at the epoch "
        "cap.</p>"
    )
    return parts


def write_html(report, path: Path, figures: list[Path]) -> Path:
    """Writes the report as one HTML page at path (figures embedded) and returns path."""
    parts = [f"<h1>Study report</h1><div class=where>{html.escape(str(report.sweep_dir))}</div>"]
    if report.study is not None:
        parts += _study_section(report.study)
    else:
        parts.append(
            '<p class="note">No verdict: no finished run with a test split (and, for one fixed split, '
            "test_predictions.csv) yet.</p>"
        )
    problems = report.problems()
    if problems:
        items = "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in problems)
        parts.append(
            f'<h2>Missing from the results</h2><ul class="missing">{items}</ul>'
            '<p class="note">The verdict above is over the runs that finished.</p>'
        )
    notes = report.data_notes()
    if notes:
        parts.append("<h2>Data</h2>" + "".join(f"<p>{html.escape(note)}</p>" for note in notes))
    if figures:
        parts.append("<h2>Plots</h2>" + "".join(_image(figure) for figure in figures))
    if any(len(point.runs) > 1 for point in report.points):
        parts.append(
            "<h2>Every point: mean ± standard deviation over its runs</h2><div class=runs>"
            + html_table(_POINT_COLUMNS, report.points)
            + "</div>"
        )
    parts.append("<h2>Every run</h2><div class=runs>" + html_table(_RUN_COLUMNS, report.rows) + "</div>")
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Study report</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
