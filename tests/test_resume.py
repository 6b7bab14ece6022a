"""Resuming and tuning through the real command line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RESUME, run_cli, run_cli_in_process


@pytest.mark.slow
@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_interrupted_then_resumed_run_ends_like_an_uninterrupted_one(tmp_path, image_folder, augment_on):
    # Dropout in the head and augmentation (in a worker process, or its parameters drawn there for the device):
    # both must continue as if never stopped.
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    options = (*RESUME, f"data.root={image_folder}", f"data.augment_on={augment_on}")
    run_cli(straight, *options, "trainer.max_epochs=3")
    run_cli(interrupted, *options, "trainer.max_epochs=2")
    result = run_cli(interrupted, *options, "trainer.max_epochs=3", "ckpt_path=last")
    assert "resuming from" in result.stdout + result.stderr

    metrics = [json.loads((run / "run" / "metrics.json").read_text()) for run in (straight, interrupted)]
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "best_epoch", "epochs"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-6), key
    weights = [
        torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for run in (straight, interrupted)
    ]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6) for k in weights[0])


def test_resume_without_a_checkpoint_says_what_to_pass(tmp_path, image_folder):
    result = run_cli_in_process(tmp_path, *RESUME, f"data.root={image_folder}", "ckpt_path=last", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert "no checkpoint to resume at" in output and "hydra.run.dir=<the run to resume>" in output


@pytest.mark.slow
def test_learning_rate_finder_runs_before_training(tmp_path, image_folder):
    result = run_cli_in_process(
        tmp_path,
        *RESUME,
        f"data.root={image_folder}",
        "tune.lr_find=true",
        "tune.num_training=20",
        "strategy=gradual",
        "trainer.max_epochs=5",
    )
    output = result.stdout + result.stderr
    assert "learning-rate finder: lr" in output
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "metrics.json").exists()


KILLABLE = (
    "trainer.precision=32-true",  # as RESUME: both runs in one precision, whatever auto would time
    "model=mobilenet_v2",
    "model.weights=null",
    "data.image_size=32",
    "data.num_workers=1",
    "data.batch_size=8",
    "data.augment=basic",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "callbacks.step_checkpoint.every_n_train_steps=3",
)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "kill_at"), [("finetune", 8), ("gradual", 10)])
def test_kill_9_then_resume_ends_like_an_uninterrupted_run_with_a_schedule(tmp_path, image_folder, strategy, kill_at):
    # The default cosine schedule (and gradual's unfreezing at epoch 2) once resumed 2e-3 away: the schedule's
    # length was read in configure_optimizers, which built the training loader before the checkpoint's place in
    # the data was restored, so the rest of the epoch replayed epoch 0's images (and gradual's on_train_start ran
    # at epoch 0: head only for the rest of the epoch). 27 images in batches of 8: 4 steps per epoch; a step
    # checkpoint every 3 steps: killed at 8 (finetune) or 10 (gradual), the run resumes mid-epoch from 6 or 9.
    options = (*KILLABLE, f"data.root={image_folder}", f"strategy={strategy}")
    run_cli(tmp_path / "straight", *options)
    killed = run_cli(
        tmp_path / "killed",
        *options,
        "+callbacks.fault._target_=faults.FaultAtStep",
        f"+callbacks.fault.step={kill_at}",
        "+callbacks.fault.signal=SIGKILL",
        check=False,
    )
    assert killed.returncode == -9
    run = tmp_path / "killed" / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == kill_at // 3 * 3
    run_cli(tmp_path / "killed", *options, "ckpt_path=last")

    metrics = [json.loads((path / "metrics.json").read_text()) for path in (tmp_path / "straight" / "run", run)]
    # Not train/loss: resumed in the last epoch (gradual), it averages only the batches after the resume.
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "epochs"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-6), key
    weights = [
        torch.load(path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for path in (tmp_path / "straight" / "run", run)
    ]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6) for k in weights[0])
