"""Each point at its own learning rate (rate_search): chosen on the run's validation split, never its test split."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import REPO, TINY, run_multirun
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from finetune.study.sweep import build_report
from finetune.training.convergence import choose_rate

SEARCH = "+rate_search={factors:[1.0,0.1],layer_decays:[0.7],probe_epochs:2,probe_epochs_uncached:1}"


def _choose(cfg, relabel_test: bool):
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    if relabel_test:  # every test image of the fold moved to another class; training and validation as they were
        classes = len(datamodule.class_names)
        datamodule.splits["test"] = [(path, (label + 1) % classes) for path, label in datamodule.splits["test"]]
    build = partial(instantiate, cfg.model, class_names=datamodule.class_names, class_weights=datamodule.loss_weights())
    return choose_rate(cfg, datamodule, build, "32-true")


def test_the_choice_never_depends_on_the_test_folds_labels(tmp_path, image_folder):
    # The default model with its packaged ImageNet weights: it learns in a few epochs, so a validation loss that
    # read the test fold's labels would move when they change.
    overrides = [
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        f"data.root={image_folder}",
        "data.folds=3",
        "data.fold=1",
        "unfreeze=2",
        f"paths.output_dir={tmp_path}",
        SEARCH.removeprefix("+").replace("probe_epochs:2", "probe_epochs:4"),
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    rate, facts = _choose(cfg, relabel_test=False)
    again, facts_again = _choose(cfg, relabel_test=True)
    assert set(facts) >= {"rate/val_loss/1x", "rate/val_loss/0.1x", "rate/val_loss/decay 0.7", "rate/backbone_factor"}
    assert rate == again
    for key, value in facts.items():
        if key != "rate/search_seconds":
            assert facts_again[key] == value, key  # the same computation, bit for bit
    assert rate in (
        {"backbone_lr": 1e-3, "layer_decay": None},
        {"backbone_lr": 1e-4, "layer_decay": None},
        {"backbone_lr": None, "layer_decay": 0.7},
    )


def test_the_search_is_off_where_only_the_head_trains_or_not_asked_for(tmp_path, image_folder):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        plain = compose("train", overrides=[*TINY, f"data.root={image_folder}", f"paths.output_dir={tmp_path}"])
        head = compose(
            "train",
            overrides=[*TINY, f"data.root={image_folder}", f"paths.output_dir={tmp_path}", "unfreeze=0", SEARCH[1:]],
        )
    assert choose_rate(plain, None, None, None) == ({}, {})
    assert choose_rate(head, None, None, None) == ({}, {})


@pytest.mark.slow
def test_a_study_trains_each_run_at_the_rate_it_chose_and_the_report_shows_it(tmp_path, image_folder):
    sweep = tmp_path / "study"
    result = run_multirun(
        tmp_path,
        sweep,
        "experiment=depth_study",
        "data.folds=2",
        *TINY,
        f"data.root={image_folder}",
        "unfreeze=0,1",
        "trainer.max_epochs=2",
        "rate_search.factors=[1.0,0.1]",
        "rate_search.probe_epochs=1",
        "callbacks.test_predictions.latency_batch=0",
    )
    for fold in (0, 1):
        head = json.loads((sweep / f"unfreeze-0_fold-{fold}" / "metrics.json").read_text())
        assert not any(key.startswith("rate/") for key in head)  # nothing to choose where only the head trains
        run = sweep / f"unfreeze-1_fold-{fold}"
        metrics = json.loads((run / "metrics.json").read_text())
        losses = {key: value for key, value in metrics.items() if key.startswith("rate/val_loss/")}
        # Layer decay 0.7 over one block is the 1x candidate again: not tried twice.
        assert set(losses) == {"rate/val_loss/1x", "rate/val_loss/0.1x"}
        winner = min(losses, key=losses.get).removeprefix("rate/val_loss/")
        assert "pretrained layers' rate, chosen on the validation split: " + winner in (run / "train.log").read_text()
        saved = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
        if winner.startswith("decay"):
            assert (saved["backbone_lr"], saved["layer_decay"]) == (None, 0.7)
        else:
            assert saved["backbone_lr"] == pytest.approx(1e-3 * float(winner.removesuffix("x")))
    # One line per run: the probes and the restart after them re-seed silently.
    assert (result.stdout + result.stderr).count("Seed set to") == 4
    report = build_report(sweep)
    rates = {row.job: row.rate for row in report.rows}
    assert rates["unfreeze-0_fold-0"] is None and rates["unfreeze-1_fold-1"] is not None
    markdown = report.to_markdown()
    row = next(line for line in markdown.splitlines() if line.startswith("| unfreeze=1 "))
    assert "rate by run" in markdown and f"| {rates['unfreeze-1_fold-0']} {rates['unfreeze-1_fold-1']} " in row
