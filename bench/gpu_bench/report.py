"""bench/gpu.py's report: the table, the notes, the study's line and the headline (the last line), written to --out."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from gpu_bench.cells import Cell


def rate(value: float | None) -> str:
    """Images a second: whole numbers, with a decimal under 100 (a CPU dry run)."""
    return fmt(value, 0 if value is not None and value >= 100 else 1)


def fmt(value, digits: int = 1, empty: str = "-") -> str:
    if value is None:
        return empty
    if isinstance(value, float):
        if value != value:
            return empty
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: list[dict], device: str) -> str:
    memory = "GPU peak GiB" if device == "cuda" else "GPU peak GiB (n/a on CPU)"
    lines = [
        f"| model | unfreeze | data path | batch | extras | images/s (whole fit) | steady images/s | data wait "
        f"(GPU) | steady data wait | host loader wait | step ms | syncs/step | {memory} | fit s = train + val + "
        f"checkpoints + other + setup | start-up s | after fit s | val acc | status |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["cell"] == "study":
            continue
        split = "-"
        if r.get("fit_s") and r.get("train_s") is not None:
            checkpoints = r.get("checkpoint_s") or 0.0
            split = (
                f"{fmt(r['fit_s'])} = {fmt(r['train_s'])} + {fmt(r['validation_s'] + r['sanity_s'])} + "
                f"{fmt(checkpoints)} + {fmt(r['other_in_fit_s'] - checkpoints)} + {fmt(r['setup_in_fit_s'])}"
            )
        lines.append(
            f"| {r['model']} | {r['unfreeze']} | {r['path']} | {r['batch']} | {'+'.join(r['extras']) or '-'} "
            f"| {rate(r.get('images_per_s'))} | {rate(r.get('steady_images_per_s'))} "
            f"| {fmt(r.get('data_wait'), 3)} | {fmt(r.get('steady_data_wait'), 3)} "
            f"| {fmt(r.get('host_loader_wait'), 3)} | {fmt(r.get('step_ms'))} | {fmt(r.get('syncs_per_step'))} "
            f"| {fmt(r.get('gpu_peak_gib'), 2)} | {split} | {fmt(r.get('before_fit_s'))} "
            f"| {fmt(r.get('after_fit_s'))} | {fmt(r.get('val_acc'), 3)} | {r['status']} |"
        )
    return "\n".join(lines)


def skipped_row(item: Cell | str, args) -> dict:
    if item == "study":
        return {
            "cell": "study",
            "status": "skipped (budget)",
            "how": "-",
            "planned_runs": 0,
            "finished_runs": 0,
            "wall_s": 0.0,
            "epochs": args.study_epochs,
        }
    return {
        "cell": item.spec,
        "status": "skipped (budget)",
        "model": item.model,
        "unfreeze": item.unfreeze,
        "path": item.path,
        "batch": item.batch,
        "extras": item.extras,
        "experiment": item.experiment,
    }


def study_line(row: dict) -> str:
    return (
        f"depth study ({row['how']}, {row['epochs']} epochs): {row['status']}; {row['finished_runs']} of "
        f"{row['planned_runs']} runs in {fmt(row['wall_s'])} s wall; whole study "
        f"{fmt(row.get('study_wall_s'))} s; mean {rate(row.get('mean_images_per_s'))} images/s over each fit"
    )


def headline(rows: list[dict], device: str) -> tuple[str, dict | None]:
    candidates = [
        r
        for r in rows
        if r["cell"] != "study"
        and r["model"] == "mobilenet_v2"
        and r["unfreeze"] == "all"
        and not r["experiment"]
        and r.get("images_per_s")
    ]
    best = max(candidates, key=lambda r: r["images_per_s"], default=None)
    prefix = "gpu" if device == "cuda" else "cpu"
    if best is None:
        return f"{prefix} mobilenet_v2 unfreeze=all images_per_second nan data_wait nan", None
    return (
        f"{prefix} mobilenet_v2 unfreeze=all images_per_second {rate(best['images_per_s']).replace(',', '')} "
        f"data_wait {best.get('data_wait', float('nan')):.3f}"
    ), best


def save(out: Path, work: Path | None, header: list[str], rows: list[dict], device: str) -> list[str]:
    """Writes the report (table, notes, last line), the figures as JSON and the runs' logs under `out`."""
    if work is not None:
        with tarfile.open(out / "gpu_logs.tar.gz", "w:gz") as archive:
            archive.add(work / "logs", arcname="logs")
            for timer in sorted(work.glob("runs/*/timer.json")):
                archive.add(timer, arcname=f"timers/{timer.parent.name}.json")
    line, best = headline(rows, device)
    study = next((r for r in rows if r["cell"] == "study"), None)
    report = [*header, "", table(rows, device), ""]
    syncs = {place for r in rows for place in (r.get("sync_places") or {})}
    if syncs:
        report.append("GPU->host synchronisations in one training step, from: " + ", ".join(sorted(syncs)))
    for r in rows:
        for note in r.get("timer_notes") or []:
            report.append(f"note ({r['cell']}): {note}")
    if study is not None:
        report.append(study_line(study))
    if best is not None:
        report.append(f"headline cell: {best['cell']} ({best['command']})")
    report.append(line)
    (out / "gpu_results.md").write_text("\n".join(report) + "\n")
    (out / "gpu_results.json").write_text(json.dumps({"header": header, "rows": rows, "last_line": line}, indent=1))
    return report
