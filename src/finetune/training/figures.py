"""Figures of a fit, drawn in the background and written to every logger that takes images: the confusion matrix
of each validation epoch and of the test, and a grid of misclassified test images."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from finetune.model.plots import BackgroundFigures, confusion_matrix_figure, image_grid_figure


class _MLflowImages:
    """An MLflow run as `BackgroundFigures` writes to it: `add_image(tag, image, step)` -> an image artifact."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self.experiment, self.run_id = logger.experiment, logger.run_id

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.experiment.log_image(self.run_id, image, artifact_file=f"figures/{tag}/step_{step:06d}.png")


class _WandbImages:
    """A W&B run as `BackgroundFigures` writes to it: `add_image(tag, image, step)` -> an image under `tag`, at
    the step (trainer/global_step) the TensorBoard image has."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.logger.log_image(key=tag, images=[image], step=step)


def image_writers(trainer: L.Trainer) -> list:
    """What each logger that takes images writes them with (public APIs: TensorBoard's SummaryWriter.add_image,
    MLflow's log_image, Lightning's WandbLogger.log_image); loggers without images (CSV) are left out."""
    writers = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writers.append(logger.experiment)
        elif isinstance(logger, MLFlowLogger):
            writers.append(_MLflowImages(logger))
        elif isinstance(logger, WandbLogger):
            writers.append(_WandbImages(logger))
    return writers


class Figures(L.Callback):
    """Confusion matrices (validation epochs, test) and the misclassified test images, written while training goes
    on (`BackgroundFigures`), by process 0, to every logger that takes images.

    The number of misclassified images is the model's `log_misclassified` (0: none). When the model runs on cached
    features, whose batches hold no images, the test images it got wrong are read from their files at the end.
    """

    def __init__(self) -> None:
        self.figures: dict[int, BackgroundFigures] = {}
        # (image or position in this process's share of the test split, label, predicted)
        self.misclassified: list[tuple[torch.Tensor | int, int, int]] = []
        self.tested = 0  # test images this process has seen so far

    def _add(self, trainer: L.Trainer, tag: str, make_figure) -> None:
        for index, writer in enumerate(image_writers(trainer)):
            self.figures.setdefault(index, BackgroundFigures()).add(writer, tag, make_figure, trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._confusion(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self.misclassified, self.tested = [], 0

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_index: int, dataloader_index: int = 0
    ) -> None:
        inputs, labels = batch[0], batch[1]
        first, self.tested = self.tested, self.tested + len(labels)
        room = pl_module.hparams.get("log_misclassified", 16) - len(self.misclassified)
        if room <= 0 or not isinstance(outputs, dict):
            return
        predicted = outputs["logits"].argmax(dim=1)
        wrong = (predicted != labels).nonzero().flatten()[:room].tolist()
        # Cached features are no picture: keep where the image is, read it at the end.
        for i in wrong:
            image = first + i if pl_module.trains_on_features else inputs[i].float().cpu()
            self.misclassified.append((image, int(labels[i]), int(predicted[i])))

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._confusion(trainer, pl_module, "test")
        # Under DDP, the images process 0 got wrong (each process keeps those of its own share).
        if self.misclassified and trainer.is_global_zero:
            preprocessing, names = pl_module.preprocessing, pl_module.class_names
            mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
            std = torch.tensor(preprocessing.std).view(3, 1, 1)
            images = [(image * std + mean).clamp(0, 1) for image in self._images(trainer)]
            captions = [f"{names[t]} -> {names[p]}" for _, t, p in self.misclassified]
            self._add(trainer, "test/misclassified", lambda: image_grid_figure(images, captions))

    def _images(self, trainer: L.Trainer) -> list[torch.Tensor]:
        """The misclassified images, normalised; those kept as positions taken from the test images as evaluated."""
        share = trainer.datamodule.evaluation_images("test", trainer.global_rank, trainer.world_size)
        return [share[image][0] if isinstance(image, int) else image for image, _, _ in self.misclassified]

    def _confusion(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        confusion = pl_module.confusion_matrices.pop(stage, None)
        if confusion is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        title, names = f"{stage}, epoch {trainer.current_epoch}", pl_module.class_names
        self._add(trainer, f"{stage}/confusion_matrix", lambda: confusion_matrix_figure(confusion, names, title))

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # Before Lightning closes the loggers: every figure of this stage is then written.
        for figures in self.figures.values():
            figures.wait()
