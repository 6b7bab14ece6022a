"""Figures drawn on a thread of their own: training goes on meanwhile, and nothing is lost or hidden."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from finetune.model.plots import BackgroundFigures, confusion_matrix_figure, render


class RecordingWriter:
    """Stands in for a SummaryWriter: records what add_image received, and on which thread."""

    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int, str, str]] = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats, threading.current_thread().name))


def test_training_does_not_wait_for_a_figure_and_each_lands_at_its_step():
    writer, figures = RecordingWriter(), BackgroundFigures()
    releases = [threading.Event(), threading.Event()]

    def slow_figure(epoch: int):
        # Drawing cannot finish until the caller has moved on.
        return lambda: (
            releases[epoch].wait(timeout=30)
            and confusion_matrix_figure([[3, 1], [epoch, 4]], ["cats", "dogs"], f"val, epoch {epoch}")
        )

    figures.add(writer, "val/confusion_matrix", slow_figure(0), step=7)
    assert writer.images == []  # add() returned while the figure was still being drawn
    releases[0].set()
    figures.add(writer, "val/confusion_matrix", slow_figure(1), step=14)
    assert [step for _, _, step, _, _ in writer.images] == [7]  # the second waited for the first, not longer
    releases[1].set()
    figures.wait()

    assert [(tag, step) for tag, _, step, _, _ in writer.images] == [
        ("val/confusion_matrix", 7),
        ("val/confusion_matrix", 14),
    ]
    for _, image, _, dataformats, thread in writer.images:
        assert dataformats == "HWC" and image.dtype == np.uint8 and image.shape[2] == 3
        assert thread.startswith("finetune-figures")
        assert image.min() < 100 < 250 < image.max()  # drawn: dark cells and text on white, not a blank canvas


def test_a_drawing_error_surfaces_at_wait():
    figures = BackgroundFigures()

    def broken():
        raise ValueError("no such class")

    figures.add(RecordingWriter(), "val/confusion_matrix", broken, step=0)
    with pytest.raises(ValueError, match="no such class"):
        figures.wait()
    figures.wait()  # reported once


def test_render_gives_the_whole_figure_in_pixels():
    figure = confusion_matrix_figure([[5, 2], [1, 7]], ["a", "b"], "test")
    image = render(figure)
    width, height = figure.get_size_inches() * figure.dpi
    assert image.shape == (round(height), round(width), 3)
