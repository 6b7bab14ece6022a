"""The depth study: k-fold splits, the study's verdict, and a small study through the real command line."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, offline_env, run_multirun, run_multirun_in_process
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from finetune.data.folders import split_kfold
from finetune.errors import UsageError
from finetune.report import PLOTS, build_report, write_report
from finetune.study.analysis import analyse
from finetune.study.points import run_folder
from finetune.study.stats import corrected_t

NAMES = ["a", "b", "c"]


def _classes(sizes=(23, 11, 7)) -> dict[int, list[str]]:
    return {label: [f"{NAMES[label]}/{i:03d}.png" for i in range(size)] for label, size in enumerate(sizes)}


def test_k_folds_test_every_image_exactly_once_and_keep_classes_in_every_split():
    by_class, k = _classes(), 5
    tested = []
    for fold in range(k):
        splits = split_kfold(by_class, k, fold, val_share=0.2 / 0.9, seed=3, class_names=NAMES)
        paths = {name: [path for path, _ in samples] for name, samples in splits.items()}
        assert not set(paths["test"]) & set(paths["train"]) and not set(paths["test"]) & set(paths["val"])
        assert not set(paths["train"]) & set(paths["val"])
        assert sum(len(p) for p in paths.values()) == 41
        for name in ("train", "val", "test"):
            assert {label for _, label in splits[name]} == {0, 1, 2}, (fold, name)
        tested += paths["test"]
    assert sorted(tested) == sorted(path for paths in by_class.values() for path in paths)


def test_folds_are_balanced_seeded_and_carve_the_validation_share_from_the_rest():
    by_class = _classes((40, 20))
    sizes = [len(split_kfold(by_class, 5, fold, 0.25, 0, NAMES)["test"]) for fold in range(5)]
    assert sizes == [12] * 5
    first = split_kfold(by_class, 5, 2, 0.25, seed=7, class_names=NAMES)
    assert first == split_kfold(by_class, 5, 2, 0.25, seed=7, class_names=NAMES)
    assert first != split_kfold(by_class, 5, 2, 0.25, seed=8, class_names=NAMES)
    assert len(first["val"]) == 8 + 4  # a quarter of each class's 32 and 16 left for training and validation
    # Uneven classes: fold sizes differ by at most one image.
    uneven = [len(split_kfold(_classes(), 5, fold, 0.2, 0, NAMES)["test"]) for fold in range(5)]
    assert max(uneven) - min(uneven) <= 1


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [
        (1, 0, "data.folds=1 must be at least 2"),
        (5, 5, "data.fold=5 must be one of 0..4"),
        (8, 0, "class 'c' has 7 image(s): too few for data.folds=8"),
    ],
)
def test_bad_fold_settings_name_the_fix(folds, fold, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        split_kfold(_classes(), folds, fold, 0.2, 0, NAMES)


# The verdict, on sweeps written by hand: what train.py leaves in each run folder, without training.


def make_fold_run(
    sweep: Path,
    unfreeze,
    fold: int | None,
    acc: float,
    seconds: float,
    *,
    seed: int = 0,
    predictions: list[tuple[str, str, str]] | None = None,
    sizes=(250, 70, 80),
    strategy: str = "finetune",
    augment: str | None = None,
    cached_views: int | None = None,
) -> Path:
    name = run_folder(strategy, unfreeze)
    job = sweep / (f"{name}_fold-{fold}" if fold is not None else f"{name}_seed-{seed}")
    (job / ".hydra").mkdir(parents=True)
    data = {"root": "/data", "split_seed": "${seed}", "folds": 5 if fold is not None else None, "fold": fold or 0}
    config = {
        "seed": seed,
        "unfreeze": unfreeze,
        "model": {"name": "tf_efficientnet_lite0"},
        "strategy": {"name": strategy, "unfreeze": 2, "cache_views": 8},
        "data": data | ({"augment": augment} if augment is not None else {}),
    }
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    overrides = [f"unfreeze={unfreeze}", *([f"data.fold={fold}"] if fold is not None else [f"seed={seed}"])]
    overrides += [f"strategy={strategy}"] if strategy != "finetune" else []
    OmegaConf.save(OmegaConf.create(["data.root=/data", *overrides]), job / ".hydra" / "overrides.yaml")
    metrics = {
        "test/acc": acc,
        "test/f1": acc - 0.05,
        "val/acc": acc,
        "time/fit_seconds": seconds,
        "params/trainable": 2562 if unfreeze == 0 else 900_000,
        "epochs": 12,
    } | ({"data/cached_views": cached_views} if cached_views is not None else {})
    (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "convergence.json").write_text(json.dumps({"epochs/used": 12, "epochs/converged": 1.0}))
    rows = [f"{split},a,x{i}.png" for split, n in zip(("train", "val", "test"), sizes, strict=True) for i in range(n)]
    (job / "split.csv").write_text("split,class,path\n" + "\n".join(rows) + "\n")
    if predictions is not None:  # (path, label, predicted[, p_a]): p_a 0.5 unless given
        lines = [
            f"{p[0]},{p[1]},{p[2]},{p[3] if len(p) > 3 else 0.5},{1 - p[3] if len(p) > 3 else 0.5}" for p in predictions
        ]
        (job / "test_predictions.csv").write_text("path,label,predicted,p_a,p_b\n" + "\n".join(lines) + "\n")
    return job


FOLD_NOISE = (0.01, -0.02, 0.0, 0.02, -0.01)


def test_a_clear_study_recommends_the_cheapest_depth_not_worse_than_the_best(tmp_path):
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        make_fold_run(sweep, 0, fold, 0.72 + noise, seconds=20)
        make_fold_run(sweep, 2, fold, 0.84 + noise + 0.005 * (fold % 2), seconds=40)
        make_fold_run(sweep, "all", fold, 0.85 + noise - 0.01 * (fold % 2), seconds=130)

    report = build_report(sweep)
    group = report.study.groups[0]
    assert group.recommended.point.unfreeze == 2 and group.best.point.unfreeze == "all"
    assert not group.undecided
    verdict = report.study.verdict
    assert verdict.startswith(
        "Significant (Holm-adjusted p < 0.05 over 3 comparisons): unfreeze=2 beats transfer learning (unfreeze=0) "
        "by +12.2 points (95% CI 11.7 to 12.7"
    )
    assert (
        "Recommended: unfreeze=2 (84.2% accuracy, 95% CI 81.0 to 87.4): the cheapest point not significantly worse "
        "than the best estimate. unfreeze=all costs 90 s more training per run (3.2x the training time) and is +0.4 "
        "points (95% CI -1.2 to 2.0" in verdict
    )
    transfer = group.transfer
    scores = [0.72 + noise for noise in FOLD_NOISE]
    assert transfer.acc == corrected_t(scores, 250, 80)  # the interval is the corrected t on the fold scores
    write_report(report, sweep, plots=False)
    markdown = (sweep / "report.md").read_text()
    assert markdown.index("## Verdict") < markdown.index("## Points") < markdown.index("## Runs")


def test_an_undecided_study_recommends_the_better_estimate_when_the_cheaper_saves_an_immaterial_cost(tmp_path):
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        make_fold_run(sweep, 0, fold, 0.80 + noise, seconds=20)
        make_fold_run(sweep, 2, fold, 0.81 - noise, seconds=40)  # +1 point on average, but it swings with the fold

    study = build_report(sweep).study
    assert study.groups[0].undecided
    assert study.groups[0].recommended.point.unfreeze == 2  # 20 s more per run buys the better estimate
    verdict = study.verdict
    assert verdict.startswith("No difference is significant (Holm-adjusted p < 0.05 over 1 comparison).")
    assert (
        "Recommended: unfreeze=2 (81.0% accuracy, 95% CI 77.8 to 84.2): the best point estimate among the points "
        "not significantly worse than the best. The cheapest of them, transfer learning (unfreeze=0) at 80.0%, "
        "would save only 20 s of training per run, within the 60 s counted as immaterial" in verdict
    )
    assert "The data cannot decide: the largest difference, unfreeze=2 against transfer learning (unfreeze=0), is " in (
        verdict
    )
    # Half-width 6.3 points around +1: a 2-point difference needs (6.3 / 2)^2 = 9.9 times the images.
    assert "To resolve a difference of 2.0 points would take roughly 4,000 images instead of the 400 here" in verdict
    assert verdict.index("No difference") < verdict.index("Recommended") < verdict.index("cannot decide")


def test_among_points_the_data_cannot_separate_the_lowest_brier_score_is_recommended(tmp_path):
    # Transfer learning has the better accuracy estimate (81.0 against 80.0, within noise), but its predictions are
    # confidently wrong where wrong; unfreeze=2's are hedged: its Brier score is lower, and 20 s more per run is
    # immaterial. On ELPV (bench/verdict_check.py) ranking by the Brier score lost fewer held-out points.
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        images = [f"{'a' if i % 2 else 'b'}/{fold}-{i}.png" for i in range(20)]
        labels = [path[0] for path in images]

        def predicted(wrong: int, p_right: float, p_wrong: float, images=images, labels=labels) -> list[tuple]:
            rows = []
            for i, (path, label) in enumerate(zip(images, labels, strict=True)):
                guess = label if i >= wrong else ("b" if label == "a" else "a")
                p_guess = p_right if i >= wrong else p_wrong
                rows.append((path, label, guess, p_guess if guess == "a" else 1 - p_guess))
            return rows

        make_fold_run(sweep, 0, fold, 0.81 + noise, seconds=20, predictions=predicted(4, 0.99, 0.99))
        make_fold_run(sweep, 2, fold, 0.80 - noise, seconds=40, predictions=predicted(4, 0.9, 0.6))

    group = build_report(sweep).study.groups[0]
    assert group.undecided and group.best is group.transfer
    assert group.transfer.brier == pytest.approx((16 * 2 * 0.01**2 + 4 * 2 * 0.99**2) / 20)
    assert group.recommended.point.unfreeze == 2 and group.ranked_by == "brier"
    assert (
        "Recommended: unfreeze=2 (80.0% accuracy, 95% CI 76.8 to 83.2): of the points not significantly worse than "
        "the best and within 60 s of training per run of the cheapest, its test predictions have the lowest Brier "
        "score (0.160; transfer learning (unfreeze=0) 0.392)." in group.verdict
    )
    assert "The cheapest, transfer learning (unfreeze=0) at 81.0%, would save only 20 s of training per run." in (
        group.verdict
    )


def test_inference_latency_never_decides_between_depths_of_one_model(tmp_path):
    # Every depth of one model is the same network at inference: their latencies differ by the machine's load alone
    # (ELPV under load, 2026-12-06: 10 to 139 ms per image). A noisy 60 ms against 10 must not veto the better point.
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        for depth, acc, seconds, ms in ((0, 0.80 + noise, 20, 10.0), (2, 0.81 - noise, 40, 60.0)):
            job = make_fold_run(sweep, depth, fold, acc, seconds=seconds)
            (job / "test_latency.json").write_text(json.dumps({"time/inference_ms_per_image": ms}))

    group = build_report(sweep).study.groups[0]
    assert group.recommended.point.unfreeze == 2
    assert "unfreeze=2" in [p.name for p in group.affordable]


def test_a_recommendation_that_is_both_the_best_and_the_cheapest_says_so(tmp_path):
    # As on ELPV-400 (2026-12-06): transfer learning has the best estimate and is the cheapest point; "every cheaper
    # point is significantly worse" would speak of points that do not exist.
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        make_fold_run(sweep, 0, fold, 0.80 + noise, seconds=20)
        make_fold_run(sweep, 2, fold, 0.79 - noise, seconds=200)

    verdict = build_report(sweep).study.verdict
    assert "Recommended: unfreeze=0 (80.0% accuracy, 95% CI" in verdict
    assert "): the best point estimate, and the cheapest point." in verdict
    assert "every cheaper point" not in verdict


def test_holm_adjusted_p_values_decide_what_is_significant(tmp_path):
    # unfreeze=2 is +2.6 points over transfer learning with p = 0.034 alone (its interval excludes zero), but it is one
    # of three comparisons: Holm makes it 3 x 0.034 = 0.10, not significant. Both fine-tuned points cost minutes
    # more than transfer learning, so the cheapest is recommended.
    sweep = tmp_path / "study"
    for fold, (noise, delta) in enumerate(zip(FOLD_NOISE, (0.03, 0.02, 0.04, 0.01, 0.03), strict=True)):
        make_fold_run(sweep, 0, fold, 0.80 + noise, seconds=20)
        make_fold_run(sweep, 2, fold, 0.80 + noise + delta, seconds=200)
        make_fold_run(sweep, 4, fold, 0.80 + 2 * noise + delta, seconds=300)

    report = build_report(sweep)
    group = report.study.groups[0]
    unadjusted = group.vs_transfer[0].difference
    assert unadjusted.excludes_zero and unadjusted.p < 0.05
    assert group.undecided and group.recommended is group.transfer
    verdict = report.study.verdict
    assert verdict.startswith("No difference is significant (Holm-adjusted p < 0.05 over 3 comparisons).")
    assert "Recommended: unfreeze=0 (80.0% accuracy, 95% CI" in verdict
    assert "the cheapest point not significantly worse than the best estimate" in verdict
    write_report(report, sweep, plots=False)
    with open(sweep / "report_comparisons.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["point"], row["against"]) for row in rows] == [
        ("unfreeze=2", "transfer learning (unfreeze=0)"),
        ("unfreeze=4", "transfer learning (unfreeze=0)"),
        ("unfreeze=4", "unfreeze=2"),
    ]
    p = [float(row["p"]) for row in rows]
    assert p[0] < p[1] < p[2]  # so by hand: 3 p1, then max(3 p1, 2 p2), then max(that, p3)
    expected = [3 * p[0], max(3 * p[0], 2 * p[1]), min(1.0, max(3 * p[0], 2 * p[1], p[2]))]
    assert [float(row["p_holm"]) for row in rows] == pytest.approx(expected)
    assert [row["significant"] for row in rows] == ["no", "no", "no"]
    assert "| p (Holm) |" in (sweep / "report.md").read_text()
    assert "<th>p (Holm)</th>" in (sweep / "report.html").read_text()


def test_the_verdict_leads_with_what_is_significant_then_recommends_then_says_what_is_undecided(tmp_path):
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        make_fold_run(sweep, 0, fold, 0.72 + noise, seconds=20)
        make_fold_run(sweep, 1, fold, 0.74 - noise, seconds=25)  # +2 over transfer learning, not significant
        make_fold_run(sweep, 2, fold, 0.84 + noise + 0.005 * (fold % 2), seconds=40)
        make_fold_run(sweep, "all", fold, 0.85 + noise - 0.01 * (fold % 2), seconds=130)

    group = build_report(sweep).study.groups[0]
    verdict = group.verdict
    significant, recommendation = verdict.split(" Recommended: ")
    recommendation, undecided = recommendation.split(" The data cannot decide ")
    # First every significant difference with its interval, and nothing else.
    assert significant.startswith("Significant (Holm-adjusted p < 0.05 over 5 comparisons): ")
    assert [c.significant for c in group.comparisons] == [False, True, True, True, False]
    assert significant.count("95% CI") == significant.count(" beats ") == 3
    assert "unfreeze=all beats unfreeze=1 by +10.6 points (95% CI 4.2 to 17.0, adjusted p = 0.031)" in significant
    assert "unfreeze=1 beats transfer" not in significant
    # Then the recommendation and why, then what the data cannot decide.
    assert recommendation.startswith("unfreeze=2 (84.2% accuracy, 95% CI 81.0 to 87.4): the cheapest point")
    assert undecided.startswith("unfreeze=1 against transfer learning (unfreeze=0): +2.0 points (95% CI -4.3 to 8.3")


def test_lp_ft_points_are_named_compared_and_recommended_by_their_setting(tmp_path):
    # python train.py experiment=depth_study 'strategy=finetune,lp_ft': LP-FT beside plain fine-tuning at each depth.
    sweep = tmp_path / "study"
    for fold, noise in enumerate(FOLD_NOISE):
        make_fold_run(sweep, 0, fold, 0.72 + noise, seconds=20)
        make_fold_run(sweep, 0, fold, 0.725 + noise, seconds=21, strategy="lp_ft")
        make_fold_run(sweep, 2, fold, 0.80 + noise, seconds=40)
        make_fold_run(sweep, 2, fold, 0.86 + noise + 0.005 * (fold % 2), seconds=41, strategy="lp_ft")

    report = build_report(sweep)
    group = report.study.groups[0]
    assert group.transfer.name == "transfer learning (unfreeze=0)" and group.transfer.point.strategy == "finetune"
    report.points.reverse()  # the reference is the plain point whatever the order the points come in
    assert analyse(report).groups[0].transfer.point.strategy == "finetune"
    assert {p.name for p in group.points} == {
        "transfer learning (unfreeze=0)",
        "LP-FT unfreeze=0",
        "unfreeze=2",
        "LP-FT unfreeze=2",
    }
    assert group.best.name == group.recommended.name == "LP-FT unfreeze=2"
    verdict = build_report(sweep).study.verdict
    assert "LP-FT unfreeze=2 beats transfer learning (unfreeze=0) by +14.2 points" in verdict
    assert "Recommended: strategy=lp_ft unfreeze=2 (86.2% accuracy" in verdict


def test_the_verdict_says_which_augmentation_regime_it_was_measured_under(tmp_path):
    def study(name: str, augment, cached_views, differing_fold: int | None = None, differing: tuple = ()) -> str:
        sweep = tmp_path / name
        for fold, noise in enumerate(FOLD_NOISE):
            for unfreeze, acc, seconds in ((0, 0.72, 20), (2, 0.84, 40), ("all", 0.85, 130)):
                setting = differing if fold == differing_fold and unfreeze == 2 else (augment, cached_views)
                views = setting[1] if unfreeze != "all" else 0  # no cache serves unfreeze=all: live
                make_fold_run(sweep, unfreeze, fold, acc + noise, seconds, augment=setting[0], cached_views=views)
        report = build_report(sweep)
        write_report(report, sweep, plots=False)
        assert report.study.verdict in (sweep / "report.md").read_text()
        return report.study.verdict

    plain = study("plain", "none", 1)
    assert plain.startswith("Significant") and plain.endswith(" Measured without training-time augmentation.")
    augmented = study("augmented", "basic", 8)
    assert augmented.endswith(
        " Measured with training-time augmentation basic: transfer learning (unfreeze=0) and unfreeze=2 trained on 8 "
        "augmented views of each training image, cached once (epoch e on view e mod 8); unfreeze=all on live "
        "augmentation, the same views in the first 8 epochs and new ones after."
    )
    # One fold of unfreeze=2 trained without augmentation: the runs of the group differ in regime.
    mixed = study("mixed", "basic", 8, differing_fold=3, differing=("none", 1))
    assert mixed.endswith(
        " Caution: these runs were not trained under one augmentation regime (augmentation basic, "
        "strategy.cache_views=8 in 14 runs; no augmentation in 1 run), so their differences are not the depth's alone."
    )
    # One fold of unfreeze=2 trained live (its cache declined): the same configuration, not the same training.
    declined = study("declined", "basic", 8, differing_fold=3, differing=("basic", 0))
    assert declined.endswith(
        " Caution: unfreeze=2 trained on cached views in some runs and on live augmentation in others (a feature "
        "cache declined: see each run's train.log), so their folds were not trained alike."
    )


def test_study_runs_are_named_by_depth_and_by_strategy_where_it_is_more_than_a_depth():
    from hydra import compose, initialize_config_dir

    import finetune.apps  # noqa: F401  registers the ${study_run:...} resolver, as train.py does

    for experiment, strategy, expected in (
        ("depth_study", "finetune", "unfreeze-2_fold-0"),
        ("depth_study", "lp_ft", "lp_ft-unfreeze-2_fold-0"),
        ("depth_study_seeds", "transfer", "unfreeze-0_seed-42"),
    ):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            overrides = [f"experiment={experiment}", f"strategy={strategy}"]
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        assert cfg.hydra.sweep.subdir == expected


def test_one_split_uses_per_image_predictions_bootstrap_and_mcnemar(tmp_path):
    sweep = tmp_path / "study"
    images = [f"img{i:03d}.png" for i in range(80)]
    labels = ["a" if i % 2 else "b" for i in range(80)]
    right_by_head = set(range(56))  # 70%
    right_by_depth = set(range(4, 76))  # 90%: 20 images only it gets right, 4 only the head does
    for unfreeze, right, seconds in ((0, right_by_head, 10), (2, right_by_depth, 30)):
        predictions = [
            (path, label, label if i in right else ("b" if label == "a" else "a"))
            for i, (path, label) in enumerate(zip(images, labels, strict=True))
        ]
        make_fold_run(sweep, unfreeze, None, len(right) / 80, seconds, predictions=predictions)

    study = build_report(sweep).study
    assert study.design == "split"
    comparison = study.groups[0].vs_transfer[0]
    assert comparison.difference.mean == pytest.approx(0.2)
    assert comparison.difference.p == pytest.approx(scipy_stats.binomtest(4, 24, 0.5).pvalue)
    assert comparison.significant and comparison.p_holm == comparison.difference.p  # a family of one
    assert study.groups[0].recommended.point.unfreeze == 2


def test_the_reports_f1_and_confusion_are_the_test_steps_on_the_saved_predictions(tmp_path):
    import torch
    from matplotlib.figure import Figure

    from finetune.model.metrics import classification_metrics
    from finetune.study.plots import _plot_confusion

    # Two seeds of one point; "c" is predicted but never the label: the test step counts it as a class (F1 0).
    images = [f"img{i:02d}.png" for i in range(30)]
    labels = ["a" if i % 3 else "b" for i in range(30)]
    runs = [
        [
            (path, label, "c" if i % 7 == seed else label if i % 4 else "a")
            for i, (path, label) in enumerate(zip(images, labels, strict=True))
        ]
        for seed in (0, 1)
    ]
    for seed, predictions in enumerate(runs):
        make_fold_run(tmp_path / "study", 0, None, 0.8, 10, seed=seed, predictions=predictions)
    report = build_report(tmp_path / "study")

    index = {"a": 0, "b": 1, "c": 2}
    pooled = [row for run in runs for row in run]
    metrics = classification_metrics(3, list(index))
    metrics.update(
        torch.tensor([index[p] for _, _, p in pooled]), torch.tensor([index[label] for _, label, _ in pooled])
    )
    expected = metrics.compute()
    assert report.study.groups[0].points[0].f1.mean == pytest.approx(float(expected["f1"]))

    figure = Figure()
    _plot_confusion(report, figure)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == list(index)
    counts = [[0] * 3 for _ in range(3)]
    for _, label, predicted in pooled:
        counts[index[label]][index[predicted]] += 1
    assert [int(text.get_text()) for text in axes.texts] == [count for row in counts for count in row]


def test_a_partial_study_reports_over_what_finished_and_lists_what_is_missing(tmp_path):
    sweep = tmp_path / "study"
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "sweeper": {"params": {"data.fold": "range(0,5)", "unfreeze": "0,2,all"}},
                    "overrides": {"task": ["data.root=/data"]},
                }
            }
        ),
        sweep.mkdir(parents=True) or sweep / "multirun.yaml",
    )
    for fold, noise in enumerate(FOLD_NOISE[:3]):
        make_fold_run(sweep, 0, fold, 0.72 + noise, seconds=20)
        make_fold_run(sweep, 2, fold, 0.84 + noise, seconds=40)
    make_fold_run(sweep, 4, 0, 0.95, seconds=60)  # one fold so far: no interval, not compared yet
    failed = make_fold_run(sweep, "all", 0, 0.9, seconds=99)
    (failed / "metrics.json").unlink()
    (failed / "train.log").write_text("[2026-12-03 10:00:00,000][finetune][ERROR] - error: out of CPU memory\n")

    report = build_report(sweep)
    assert report.study.groups[0].recommended.point.unfreeze == 2  # over the three folds that finished
    assert report.study.verdict.endswith("Not compared yet, too few finished folds: unfreeze=4 (1 fold).")
    problems = "\n".join(report.problems())
    assert (
        "job unfreeze-all_fold-0 (tf_efficientnet_lite0/finetune/unfreeze=all/seed=0/fold=0) failed: out of CPU "
        "memory" in problems
    )
    assert "- data.fold=1 unfreeze=all: not started" in problems
    assert "- data.fold=2 unfreeze=all: not started" in problems
    assert "- data.fold=3 unfreeze=0,2,all: not started" in problems  # one line for what differs only in depth
    assert "- data.fold=4 unfreeze=0,2,all: not started" in problems
    assert problems.count("not started") == 4


def test_the_pareto_plot_labels_never_overlap_however_close_the_points(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from finetune.study.plots import _plot_pareto

    sweep = tmp_path / "study"
    depths = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, "all")  # fourteen nearly equal points, one far off
    for fold, noise in enumerate(FOLD_NOISE):
        for depth in depths:
            close = depth != "all"
            accuracy = 0.80 + 0.001 * depth if close else 0.9
            make_fold_run(sweep, depth, fold, accuracy + noise, seconds=20 + 0.2 * depth if close else 300)
    report = build_report(sweep)
    figure = Figure(figsize=(8, 5), layout="constrained")
    _plot_pareto(report, figure)
    FigureCanvasAgg(figure).draw()
    labels = figure.axes[0].texts
    assert sorted(label.get_text() for label in labels) == sorted(p.name for p in report.study.groups[0].points)
    boxes = [Text.get_window_extent(label) for label in labels]  # the text alone, without its leader line
    overlapping = [
        (a.get_text(), b.get_text())
        for i, a in enumerate(labels)
        for j, b in enumerate(labels[:i])
        if boxes[i].overlaps(boxes[j])
    ]
    assert not overlapping
    assert all(figure.bbox.contains(box.x1, box.y1) and figure.bbox.contains(box.x0, box.y0) for box in boxes)


# A depth study of two folds on the tiny generated folder, MobileNetV2 at random init, 32 px. data.folds=2 alone
# makes the sweep run folds 0 and 1.
TINY_STUDY = (
    "experiment=depth_study",
    "data.folds=2",
    "model=mobilenet_v2",
    "model.weights=null",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.folds=3", "data.fold=0,1,2,3"), "error: data.fold=0,1,2,3 is swept but data.folds=3 has folds 0..2"),
        (("data.folds=2", "data.fold=range(0,5)"), "error: data.fold=0,1,2,3,4 is swept but data.folds=2"),
        (("data.folds=null",), "is swept but data.folds=null (one fixed split, no folds)"),
    ],
)
def test_a_sweep_whose_folds_contradict_data_folds_stops_before_its_first_run(tmp_path, overrides, message):
    sweep = tmp_path / "study"
    result = run_multirun_in_process(tmp_path, sweep, *TINY_STUDY, "data.root=/nowhere", *overrides, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not sweep.exists()  # no run started


@pytest.mark.slow
def test_lp_ft_points_join_a_study_through_the_command_line(tmp_path, image_folder):
    sweep = tmp_path / "study"
    run_multirun(
        tmp_path,
        sweep,
        *TINY_STUDY,
        f"data.root={image_folder}",
        "strategy=finetune,lp_ft",
        "unfreeze=0,1",
        "trainer.max_epochs=1",
        "callbacks.test_predictions.latency_batch=0",
    )
    runs = {path.name for path in sweep.iterdir() if (path / ".hydra").is_dir()}
    assert runs == {
        f"{kind}unfreeze-{depth}_fold-{fold}" for kind in ("", "lp_ft-") for depth in (0, 1) for fold in (0, 1)
    }
    assert "linear probe (LP-FT)" in (sweep / "lp_ft-unfreeze-1_fold-0" / "train.log").read_text()
    assert "linear probe (LP-FT)" not in (sweep / "unfreeze-1_fold-0" / "train.log").read_text()
    report = build_report(sweep)
    names = {point.name for point in report.study.groups[0].points}
    assert names == {"transfer learning (unfreeze=0)", "unfreeze=1", "LP-FT unfreeze=0", "LP-FT unfreeze=1"}
    assert report.study.groups[0].transfer.point.strategy == "finetune"


@pytest.mark.slow
def test_a_small_depth_study_with_augmentation_through_the_command_line(tmp_path, image_folder):
    # python train.py experiment=depth_study data.augment=basic: cached views for unfreeze=0, live for unfreeze=all.
    sweep = tmp_path / "study"
    run_multirun(
        tmp_path,
        sweep,
        *TINY_STUDY,
        f"data.root={image_folder}",
        "data.augment=basic",
        "strategy.cache_views=2",
        "unfreeze=0,all",
        "trainer.max_epochs=2",
        "rate_search=null",
        "callbacks.test_predictions.latency_batch=0",
    )
    for fold in (0, 1):
        assert json.loads((sweep / f"unfreeze-0_fold-{fold}" / "metrics.json").read_text())["data/cached_views"] == 2
        assert json.loads((sweep / f"unfreeze-all_fold-{fold}" / "metrics.json").read_text())["data/cached_views"] == 0
    assert "feature cache: 2 training view(s)" in (sweep / "unfreeze-0_fold-0" / "train.log").read_text()
    assert build_report(sweep).study.verdict.endswith(
        " Measured with training-time augmentation basic: transfer learning (unfreeze=0) trained on 2 augmented views "
        "of each training image, cached once (epoch e on view e mod 2); unfreeze=all on live augmentation, the same "
        "views in the first 2 epochs and new ones after."
    )


@pytest.mark.slow
def test_a_small_depth_study_through_the_command_line(tmp_path, image_folder):
    sweep = tmp_path / "study"
    run_multirun(
        tmp_path,
        sweep,
        *TINY_STUDY,
        f"data.root={image_folder}",
        "unfreeze=0,all",
        "trainer.max_epochs=2",
        "callbacks.test_predictions.latency_batch=2",
        "callbacks.test_predictions.latency_repeats=1",
    )

    # Each run named by what differs in the sweep: TensorBoard lists them so.
    runs = {path.name for path in sweep.iterdir() if (path / ".hydra").is_dir()}
    assert runs == {"unfreeze-0_fold-0", "unfreeze-0_fold-1", "unfreeze-all_fold-0", "unfreeze-all_fold-1"}
    tested = []
    for run in runs:
        assert any((sweep / run / "tensorboard").glob("events.out.tfevents.*"))
        convergence = json.loads((sweep / run / "convergence.json").read_text())
        assert convergence["epochs/used"] == 2 and convergence["epochs/converged"] == 0.0  # the cap, not converged
        assert json.loads((sweep / run / "test_latency.json").read_text())["time/inference_ms_per_image"] > 0
        with open(sweep / run / "test_predictions.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        assert set(rows[0]) == {"path", "label", "predicted", "p_circle", "p_square", "p_stripes"}
        if run.startswith("unfreeze-0"):
            tested += [row["path"] for row in rows]
    assert len(tested) == len(set(tested)) == 36  # the two folds test every image once
    # The second fold runs no frozen forward pass: the first fold's features, the same images, are shared.
    log = (sweep / "unfreeze-0_fold-1" / "train.log").read_text()
    for split in ("train", "val", "test"):
        assert re.search(rf"feature cache: (\d+) of \1 {split} images' features reused", log), log

    result = subprocess.run(
        [sys.executable, "-m", "finetune.report", f"sweep_dir={sweep}"],
        cwd=REPO,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "## Verdict" in result.stdout and "Recommended: unfreeze=" in result.stdout
    page = (sweep / "report.html").read_text()
    assert page.index("Verdict") < page.index("Paired comparisons") < page.index("Every run")
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "http://" not in page and "https://" not in page  # nothing fetched: it opens offline
    with open(sweep / "report_study.csv", newline="") as file:
        assert [row["unfreeze"] for row in csv.DictReader(file)] == ["0", "all"]
    if shutil.which("chromium"):  # what a user sees: the page renders, verdict and plots included
        screenshot = tmp_path / "report.png"
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={screenshot}",
                "--window-size=1200,2000",
                (sweep / "report.html").as_uri(),
            ],
            capture_output=True,
            timeout=120,
        )
        assert screenshot.stat().st_size > 50_000
