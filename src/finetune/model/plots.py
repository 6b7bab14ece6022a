"""Figures shared by training (TensorBoard) and evaluation (PNG files)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:  # torch takes seconds to import: `python -m finetune.report` imports this module at start
    import torch

# Past this many classes the counts no longer fit in the cells; the colours still tell the story.
MAX_ANNOTATED_CLASSES = 30


def confusion_matrix_figure(
    confusion: Sequence[Sequence[int]] | torch.Tensor, class_names: Sequence[str], title: str
) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted) with the count in every cell."""
    # A Figure without pyplot: no global backend is switched, and savefig renders with Agg.
    side = min(4 + 0.5 * len(class_names), 40)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    draw_confusion_matrix(figure.subplots(), confusion, class_names, title)
    return figure


def draw_confusion_matrix(
    axes: Axes,
    confusion: Sequence[Sequence[int]] | torch.Tensor,
    class_names: Sequence[str],
    title: str,
    fontsize: float | None = None,
) -> None:
    """Draws the confusion matrix into `axes` (`confusion_matrix_figure`, or one panel of several); `fontsize`: of
    the counts and class names (None: matplotlib's)."""
    n = len(class_names)
    counts = np.asarray(confusion)
    image = axes.imshow(counts, cmap="Blues", vmin=0)
    annotated = n <= MAX_ANNOTATED_CLASSES
    if not annotated:  # with the counts in the cells a colour scale says nothing more (and doubles the drawing time)
        axes.figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    axes.set_yticks(range(n), labels=class_names, fontsize=fontsize)
    axes.set(xlabel="predicted class", ylabel="true class")
    axes.set_title(title, fontsize=fontsize)
    if annotated:
        threshold = counts.max() / 2
        for (row, column), value in np.ndenumerate(counts):
            colour = "white" if value > threshold else "black"
            axes.text(column, row, str(value), ha="center", va="center", color=colour, fontsize=fontsize)


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


def render(figure: Figure) -> np.ndarray:
    """The figure as an RGB image (height x width x 3, uint8), drawn with Agg: no pyplot, no global state."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class BackgroundFigures:
    """Draws figures and writes them to TensorBoard on a thread of its own, so training does not wait for them.

    Drawing a confusion matrix takes 0.05 s for 2 classes and 2-3 s for 30-100 (this 2-core CPU), at every
    validation epoch: time a GPU would otherwise spend idle. One figure at a time is in flight: a new one first
    waits for the one before (at most one epoch behind, never a growing queue). `wait()` before the logger is
    closed (the module's `teardown`): then every figure is in the event file, and a drawing error surfaces.
    """

    def __init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def add(self, writer, tag: str, make_figure: Callable[[], Figure], step: int) -> None:
        """Calls `make_figure` on the drawing thread and writes the result to `writer` (a SummaryWriter) at `step`.
        `make_figure` must only read values that no longer change (CPU tensors, strings)."""
        self.wait()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-figures")
        self._pending = self._thread.submit(
            lambda: writer.add_image(tag, render(make_figure()), step, dataformats="HWC")
        )

    def wait(self) -> None:
        """Returns once the last figure is written; raises what drawing or writing it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __getstate__(self) -> dict:
        # A copied or pickled model gets a drawing thread of its own, if it ever draws.
        return {"_thread": None, "_pending": None}
