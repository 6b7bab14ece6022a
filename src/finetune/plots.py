"""Figures shared by training (TensorBoard) and evaluation (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

# Past this many classes the counts no longer fit in the cells; the colours still tell the story.
MAX_ANNOTATED_CLASSES = 30


def confusion_matrix_figure(confusion: Sequence[Sequence[int]] | torch.Tensor, class_names: Sequence[str],
                            title: str) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted) with the count in every cell."""
    # A Figure without pyplot: no global backend is switched, and savefig renders with Agg.
    n = len(class_names)
    side = min(4 + 0.5 * n, 40)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    axes = figure.subplots()
    counts = torch.as_tensor(confusion)
    image = axes.imshow(counts.numpy(), cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n), labels=class_names)
    axes.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = counts.max().item() / 2
        for row in range(n):
            for column in range(n):
                value = counts[row, column].item()
                axes.text(column, row, str(value), ha="center", va="center",
                          color="white" if value > threshold else "black")
    return figure


def image_grid_figure(images: Sequence[torch.Tensor], captions: Sequence[str], columns: int = 4) -> Figure:
    """Images (CHW in [0, 1]) in a grid, each with its caption."""
    rows = (len(images) + columns - 1) // columns
    figure = Figure(figsize=(2.5 * columns, 2.7 * rows), layout="constrained")
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if index < len(images):
            axes.imshow(images[index].permute(1, 2, 0).numpy())
            axes.set_title(captions[index], fontsize=8)
    return figure
