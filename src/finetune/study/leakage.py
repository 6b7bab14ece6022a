"""What the report says about leakage between splits: groups kept together, near-duplicates left across splits.

Read from each run's metrics.json (`data/groups`, `data/cross_split_duplicates`, written by
`finetune.training.run`); the pairs themselves are in each run folder's duplicates.csv.
"""

from __future__ import annotations

from collections.abc import Sequence


def leakage_notes(rows: Sequence) -> list[str]:
    """One note when splits kept groups together, one warning when near-duplicates crossed splits."""
    notes = []
    grouped = [row for row in rows if row.get("data/groups")]
    if grouped:
        notes.append(
            f"Groups kept together in {len(grouped)} run(s) (data.groups, data.group_by or data.duplicates=group): "
            f"up to {int(max(row.get('data/groups') for row in grouped))} groups, each on one side of every split."
        )
    crossing = [row for row in rows if row.get("data/cross_split_duplicates")]
    if crossing:
        notes.append(
            f"Near-duplicate images cross splits in {len(crossing)} run(s) and were left in place (up to "
            f"{int(max(row.get('data/cross_split_duplicates') for row in crossing))} pairs): test scores may "
            "measure memory. See duplicates.csv in the run folders; data.duplicates=group keeps each pair on one side."
        )
    return notes


def verdict_caveat(rows: Sequence) -> str:
    """A sentence the verdict ends with: how far the splits kept related images apart ("" when nothing to say)."""
    if any(row.get("data/cross_split_duplicates") for row in rows):
        return (
            " Caution: near-duplicate images cross splits in some of these runs, so the accuracies may be too "
            "high (see duplicates.csv; data.duplicates=group)."
        )
    if rows and all(row.get("data/groups") for row in rows):
        return " The splits kept each group of related images on one side."
    return ""
