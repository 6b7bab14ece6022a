"""The architecture contract over every torchvision classification model and one model of every timm family.

For each model (random init, no download): it builds with a new head; every parameter lies in exactly one block
or the head; it has at least two blocks and `unfreeze=1` trains fewer parameters than `unfreeze=all`; at
`unfreeze=1` a forward/backward pass gives gradients to exactly the trainable parameters; and BatchNorm layers of
frozen blocks stay in eval mode with their statistics unchanged (tests/contract.py).

Cost on CI's two cores: networks over FULL_CONTRACT_CAP parameters spend most of their time on random
initialisation (VGG, RegNetY-128GF, ViT-H and the like take 10-80 s each), so they get the block checks on the meta
device (no memory, no initialisation) and not the forward/backward pass; every family still gets the whole
contract through its smallest member, whatever its size. Images are 64 px where the model takes them, else the
smallest size it does.

The default path (`test_default_path_trains_one_step`): what `python train.py model=torchvision model.name=<name>
data.root=...` runs, in-process through `finetune.train`: unfreeze=2, the feature cache on where it applies (or
declined with its reason in one line), the class-weighted loss; one training step, one validation and one test
batch, the test predictions and their latency timing (on 2 images). Every torchvision family's smallest model and
every timm family's under FULL_CONTRACT_CAP, on four images a class.
"""

from __future__ import annotations

import logging
import math

import pytest
import timm
from conftest import make_image_folder, run_cli_in_process
from contract import check_contract, check_structure, parameter_count
from timm.models import _registry
from torchvision import models

import finetune

FULL_CONTRACT_CAP = 30_000_000

TORCHVISION = models.list_models(module=models)
# Input sizes of models that do not take 64 px images: ViTs are built for one size; Inception-v3 needs 75 px.
TORCHVISION_SIZES = {
    "maxvit_t": 224,
    "inception_v3": 75,
    **{name: 224 for name in TORCHVISION if name.startswith("vit_")},
}
# The smallest model of each torchvision builder module: it gets the whole contract even over the cap.
TORCHVISION_FAMILIES = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "maxvit": "maxvit_t",
    "mnasnet": "mnasnet0_5",
    "mobilenetv2": "mobilenet_v2",
    "mobilenetv3": "mobilenet_v3_small",
    "regnet": "regnet_x_400mf",
    "resnet": "resnet18",
    "shufflenetv2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "swin_transformer": "swin_t",
    "vgg": "vgg11",
    "vision_transformer": "vit_b_16",
}

# One model of every timm family (the module that registers it), the smallest that has been found, and the
# image size it runs at. Over FULL_CONTRACT_CAP (the family has nothing smaller): block checks only.
TIMM_FAMILIES = {
    "beit": ("beit_base_patch16_224", 224),
    "byoanet": ("halonet_h1", 256),
    "byobnet": ("test_byobnet", 64),
    "cait": ("cait_xxs24_224", 224),
    "coat": ("coat_tiny", 224),
    "convit": ("convit_tiny", 224),
    "convmixer": ("convmixer_768_32", 64),
    "convnext": ("test_convnext", 64),
    "cpubone": ("cpubone_nano", 64),
    "crossvit": ("crossvit_tiny_240", 64),
    "csatv2": ("csatv2", 64),
    "cspnet": ("cs3darknet_focus_s", 64),
    "cspnext": ("cspnext_tiny", 64),
    "davit": ("davit_tiny", 64),
    "deepseek_vit": ("deepseek_vit_412m", 224),
    "deit": ("deit_tiny_distilled_patch16_224", 224),  # two classifiers (class and distillation tokens)
    "densenet": ("densenet121", 64),
    "dla": ("dla46_c", 64),
    "dpn": ("dpn48b", 64),
    "edgenext": ("edgenext_xx_small", 64),
    "efficientformer": ("efficientformer_l1", 224),
    "efficientformer_v2": ("efficientformerv2_s0", 224),
    "efficientnet": ("test_efficientnet", 64),
    "efficientvim": ("efficientvim_m1", 64),
    "efficientvit_mit": ("efficientvit_b0", 64),
    "efficientvit_msra": ("efficientvit_m0", 64),
    "eva": ("eva02_tiny_patch14_224", 224),
    "fasternet": ("fasternet_s", 64),
    "fastvit": ("fastvit_t8", 64),
    "focalnet": ("focalnet_tiny_lrf", 64),
    "gcvit": ("gcvit_tiny", 224),
    "gemma4_vit": ("gemma4_vit_167m", 224),
    "ghostnet": ("ghostnet_050", 64),
    "hardcorenas": ("hardcorenas_a", 64),
    "hgnet": ("hgnet_tiny", 64),
    "hiera": ("hiera_tiny_224", 224),
    "hieradet_sam2": ("sam2_hiera_tiny", 64),
    "hrnet": ("hrnet_w18_small", 64),
    "iformer": ("iformer_s", 64),
    "inception_next": ("inception_next_atto", 64),
    "inception_resnet_v2": ("inception_resnet_v2", 299),
    "inception_v3": ("inception_v3", 299),
    "inception_v4": ("inception_v4", 299),
    "lcnetv2": ("lcnetv2_small", 64),
    "levit": ("levit_128s", 224),  # two classifiers (class and distillation tokens)
    "lowformer": ("lowformer_b0", 64),
    "mambaout": ("test_mambaout", 64),
    "maxxvit": ("test_maxvit", 160),
    "metaformer": ("caformer_s18", 64),
    "mlp_mixer": ("mixer_s32_224", 224),
    "mobilenetv3": ("mobilenetv3_small_050", 64),
    "mobilenetv5": ("mobilenetv5_300m", 64),
    "mobilevit": ("mobilevit_xxs", 64),
    "mvitv2": ("mvitv2_tiny", 64),
    "naflexvit": ("naflexvit_base_patch16_siglip", 224),
    "nasnet": ("nasnetalarge", 331),
    "nest": ("nest_tiny", 224),
    "nextvit": ("nextvit_small", 64),
    "nfnet": ("test_nfnet", 64),
    "pit": ("pit_xs_224", 224),
    "pnasnet": ("pnasnet5large", 331),
    "pvt_v2": ("pvt_v2_b0", 64),
    "qwen3_vit": ("qwen3_vit_88m", 224),
    "rdnet": ("rdnet_tiny", 64),
    "regnet": ("regnetx_002", 64),
    "repghost": ("repghostnet_050", 64),
    "repvit": ("repvit_m1", 64),
    "res2net": ("res2net50_14w_8s", 64),
    "resnest": ("resnest14d", 64),
    "resnet": ("test_resnet", 64),
    "resnetv2": ("resnetv2_18", 64),
    "rexnet": ("rexnet_100", 64),
    "selecsls": ("selecsls42b", 64),
    "senet": ("legacy_seresnet18", 64),
    "sequencer": ("sequencer2d_s", 64),
    "shvit": ("shvit_s1", 64),
    "sknet": ("skresnet18", 64),
    "starnet": ("starnet_s1", 64),
    "swiftformer": ("swiftformer_xs", 64),
    "swin_transformer": ("swin_tiny_patch4_window7_224", 224),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", 256),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", 224),
    "tiny_vit": ("tiny_vit_5m_224", 64),
    "tnt": ("tnt_s_patch16_224", 224),
    "tresnet": ("tresnet_m", 64),
    "twins": ("twins_svt_small", 64),
    "vgg": ("vgg11", 64),
    "visformer": ("visformer_tiny", 224),
    "vision_transformer": ("test_vit", 64),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 224),
    "vision_transformer_relpos": ("test_vit_relpos", 160),
    "vision_transformer_sam": ("samvit_base_patch16", 1024),
    "vitamin": ("vitamin_small_224", 224),
    "volo": ("volo_d1_224", 224),
    "vovnet": ("ese_vovnet19b_slim", 64),
    "xception": ("legacy_xception", 64),
    "xception_aligned": ("xception41", 64),
    "xcit": ("xcit_nano_12_p8_224", 64),
}


def test_every_torchvision_builder_family_has_a_representative():
    families = {models.get_model_builder(name).__module__.rsplit(".", 1)[-1] for name in TORCHVISION}
    assert families == set(TORCHVISION_FAMILIES)


def test_every_timm_family_has_a_representative():
    families = {_registry._model_to_module[name] for name in timm.list_models()}
    assert families == set(TIMM_FAMILIES), "a timm family without a model in TIMM_FAMILIES"
    assert all(timm.is_model(name) for name, _ in TIMM_FAMILIES.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_contract(name):
    if parameter_count("torchvision", name) > FULL_CONTRACT_CAP and name not in TORCHVISION_FAMILIES.values():
        check_structure("torchvision", name)  # built, not swept: see the module docstring
        return
    check_contract("torchvision", name, TORCHVISION_SIZES.get(name, 64))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_timm_contract(family):
    name, size = TIMM_FAMILIES[family]
    if parameter_count("timm", name) > FULL_CONTRACT_CAP:
        check_structure("timm", name)  # the family's smallest is over the cap: see the module docstring
        return
    check_contract("timm", name, size)


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    """Four images a class, 2/1/1 after the default split: the default path trains one step and evaluates one
    batch of each split, so more images would only lengthen the passes over every image (the feature cache)."""
    return make_image_folder(tmp_path_factory.mktemp("few_images"), per_class=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "name", "size"),
    [("torchvision", name, TORCHVISION_SIZES.get(name, 64)) for name in TORCHVISION_FAMILIES.values()]
    + [("timm", *TIMM_FAMILIES[family]) for family in sorted(TIMM_FAMILIES)],
)
def test_default_path_trains_one_step(tmp_path, few_images, caplog, monkeypatch, source, name, size):
    if source == "timm" and parameter_count("timm", name) > FULL_CONTRACT_CAP:
        pytest.skip("over FULL_CONTRACT_CAP: block checks only (test_timm_contract)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    caplog.set_level(logging.INFO)
    metrics = finetune.train(
        [
            f"model={source}",
            f"model.name={name}",
            "model.weights=null",
            f"data.root={few_images}",
            f"data.image_size={size}",
            "data.batch_size=4",  # BatchNorm of a trained block needs two values per channel
            "data.num_workers=0",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false",
            # The latency timing runs (warm-up and one timed batch) on 2 images, not 4 batches of 8: at 8 it took
            # more than half of this test's time for 224 px models (vit_b_16: 46 of 84 s).
            "callbacks.test_predictions.latency_batch=2",
            "callbacks.test_predictions.latency_repeats=1",
            "logger=csv",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss"]), metrics
    assert metrics["params/trainable"] < metrics["params/total"]
    assert metrics["data/balanced"] == 1.0  # data.balance=loss_weights, the default
    decisions = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith(("feature cache on", "feature cache off"))
    ]
    assert len(decisions) == 1, decisions  # cached, or declined with one reason
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fasterrcnn_resnet50_fpn", "is from torchvision.models.detection: it is not an image classifier"),
        ("quantized_mobilenet_v2", "runs int8 inference only"),
    ],
)
def test_a_model_that_cannot_be_fine_tuned_is_refused_with_one_line(tmp_path, image_folder, name, expected):
    result = run_cli_in_process(
        tmp_path,
        "model=torchvision",
        f"model.name={name}",
        "model.weights=null",
        f"data.root={image_folder}",
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors
