"""trainer.precision=auto: bf16 where the CPU has it and a timed step pays, said in the log and metrics.json; an
explicit precision measures nothing; the feature pass and its cache follow, kept apart by dtype."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import TINY, run_cli
from omegaconf import OmegaConf

import finetune
from finetune.data.datamodule import ImageFolderDataModule
from finetune.features.cache import build_cache, should_cache
from finetune.features.store import SharedFeatures
from finetune.model import precision
from finetune.model.module import ImageClassifier

HAS_BF16 = precision.cpu_bf16() is not None


def metrics_of(run) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


def cache_line(output: str) -> str:
    """The log line that says what the feature cache holds: `feature cache: 1 training view(s), ..., float32, ...`."""
    return re.search(r"feature cache: 1 training view.*", output)[0]


@pytest.mark.skipif(not HAS_BF16, reason="measures only on a CPU with AMX or avx512_bf16")
def test_auto_measures_on_a_cpu_with_bf16_and_says_what_it_chose(tmp_path, image_folder):
    # TINY fine-tunes 2 blocks on cached features: the step measured is theirs, the feature pass measured apart.
    result = run_cli(tmp_path, *TINY, f"data.root={image_folder}", "trainer.max_epochs=1", "trainer.precision=auto")
    output = result.stdout + result.stderr
    chosen = re.search(r"precision: (bf16-mixed|32-true) \(the CPU has (AMX|avx512_bf16)[;,] .*?(\d+\.\d+)x", output)
    assert chosen, output[-3000:]
    run = tmp_path / "run"
    metrics = metrics_of(run)
    assert metrics["precision/bf16"] == float(chosen[1] == "bf16-mixed")
    assert f"{metrics['precision/bf16_speedup']:.2f}x" == f"{chosen[3]}x" and "a training step on cached" in output
    # bf16 where it paid in steady timings, fp32 otherwise; the feature pass by its own measurement.
    for prefix in ("precision/", "precision/feature_pass_"):
        speedup, spread = metrics[f"{prefix}bf16_speedup"], metrics[f"{prefix}bf16_spread"]
        assert metrics[f"{prefix}bf16"] == float(speedup >= precision.PAYS and spread <= precision.UNSTEADY)
    bf16_features = metrics["precision/feature_pass_bf16"]
    assert f"{'bfloat16' if bf16_features else 'float32'}, " in cache_line(output)
    # A resumed run goes on in the precision the checkpoint records.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["precision"] == chosen[1]


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["32-true", "bf16-mixed"])
def test_an_explicit_precision_is_used_as_given_and_nothing_is_measured(tmp_path, image_folder, setting):
    result = run_cli(
        tmp_path, *TINY, f"data.root={image_folder}", "trainer.max_epochs=1", f"trainer.precision={setting}"
    )
    output = result.stdout + result.stderr
    assert f"precision: {setting} (trainer.precision as set: nothing measured)" in output
    assert f"feature pass: {setting} (as trainer.precision={setting})" in output
    bf16 = float(setting == "bf16-mixed")
    metrics = metrics_of(tmp_path / "run")
    assert metrics["precision/bf16"] == metrics["precision/feature_pass_bf16"] == bf16
    assert not any(key.endswith(("_speedup", "_spread")) for key in metrics)
    assert f"{'bfloat16' if bf16 else 'float32'}, " in cache_line(output)


def test_a_cpu_without_bf16_trains_in_fp32_and_says_why(tmp_path, image_folder, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    monkeypatch.setattr(precision, "_measure", lambda *_: pytest.fail("measured"))
    with caplog.at_level(logging.INFO, logger="finetune"):
        metrics = finetune.train(
            [*TINY, f"data.root={image_folder}", "trainer.max_epochs=1", "trainer.precision=auto"]
            + [f"hydra.run.dir={tmp_path / 'run'}"]
        )
    why = "auto: the CPU has neither AMX nor avx512_bf16, so bf16 would be emulated"
    assert f"precision: 32-true ({why})" in caplog.messages
    assert f"feature pass: 32-true ({why})" in caplog.messages
    assert metrics["precision/bf16"] == metrics["precision/feature_pass_bf16"] == 0
    assert not any(key.endswith(("_speedup", "_spread")) for key in metrics)


def test_bf16_features_feed_an_fp32_training_step(tmp_path, image_folder, monkeypatch):
    # The case auto picks where the forward pass pays and the step does not (EfficientNet-Lite0 on 2 cores): the
    # cache holds bf16, the trainable blocks train in fp32 on the features cast back.
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    monkeypatch.setattr(precision, "_measure", lambda key, make_step: (2.0 if key[0] == "forward" else 1.0, 1.05))
    metrics = finetune.train(
        [*TINY, f"data.root={image_folder}", "trainer.max_epochs=1", "trainer.precision=auto"]
        + [f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert metrics["precision/bf16"] == 0 and metrics["precision/bf16_speedup"] == 1.0
    assert metrics["precision/feature_pass_bf16"] == 1 and metrics["precision/feature_pass_bf16_speedup"] == 2.0
    assert 0 <= metrics["test/acc"] <= 1


@pytest.mark.parametrize(
    ("trainer", "why"),
    [
        ({"accelerator": "gpu"}, ("auto on gpu: fp32 as before", "auto on cuda: fp32 as before")),
        ({"accelerator": "cpu", "devices": 2}, ("auto with 2 processes",)),
        ({"accelerator": "cpu", "num_nodes": 2}, ("auto with 2 processes",)),
    ],
)
def test_auto_stays_fp32_unmeasured_off_the_cpu_and_under_ddp(trainer, why, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX")
    choice = precision.choose_precision(OmegaConf.create({"precision": "auto", **trainer}), None, None)
    assert choice.precision == "32-true" and choice.reason.startswith(why) and choice.speedup is None


def test_a_resumed_auto_run_goes_on_in_the_precision_it_started_in(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"precision": "bf16-mixed"}, checkpoint)
    choice = precision.choose_precision(OmegaConf.create({"precision": "auto"}), None, None, str(checkpoint))
    assert choice.precision == "bf16-mixed" and choice.reason == "auto: as the run being resumed chose"


def test_the_feature_store_keeps_bf16_and_fp32_features_apart(image_folder):
    store = SharedFeatures()
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", ["circle", "square", "stripes"], weights=None, image_size=32, unfreeze=1)
    datamodule = ImageFolderDataModule(
        str(image_folder), batch_size=8, num_workers=0, image_size=32, preprocessing=model.preprocessing
    )
    datamodule.setup("fit")  # without a Trainer: images, every split
    cut, _ = should_cache("auto", model, datamodule)
    cpu = torch.device("cpu")
    fp32 = build_cache(model, datamodule, cut, views=1, device=cpu, store=store)
    passes = []
    model.network.register_forward_pre_hook(lambda *_: passes.append(1))
    bf16 = build_cache(model, datamodule, cut, views=1, device=cpu, store=store, dtype=torch.bfloat16)
    assert passes, "bf16 features were served from the fp32 ones"
    assert bf16["val"][0].dtype == torch.bfloat16 and fp32["val"][0].dtype == torch.float32
    assert torch.allclose(bf16["val"][0].float(), fp32["val"][0], rtol=0.05, atol=0.05)  # the same, to bf16's 3 digits
    passes.clear()
    again = build_cache(model, datamodule, cut, views=1, device=cpu, store=store, dtype=torch.bfloat16)
    assert not passes  # the next run of the process reuses them, bit for bit
    for split in ("train", "val", "test"):
        assert torch.equal(again[split][0], bf16[split][0])
