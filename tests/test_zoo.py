"""The model zoo: every torchvision classification model and timm CNNs across families.

Each model (random weights, BatchNorm statistics randomized so folding is real, small
inputs) is quantized with ``unsupported="float"`` and checked against the issue's promises:

* the float model is untouched (state_dict and module classes);
* ``describe`` has one row per Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear instance of
  the model, the quantized count is that total less the float rows, each float row gives a
  reason, and architectures without attention have no float row at all;
* the outputs are bit-identical to an independent reference: the BatchNorm-folded float
  model whose every conv/linear call gets its input and weight through the formats'
  functional ``quantize``, by hooks and a torch function mode written here (not
  logquant.nn's machinery), with the formats ``describe`` reports for the layer.

The quick run takes a fixed, seeded sample (``quick_sample``); ``-m slow`` the whole zoo.
``pytest -s`` prints one line of counts per model; ``scripts/zoo_coverage.py`` writes the
coverage table (docs/COVERAGE.md) from the same code.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
import zlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from logquant import QuantConfig, describe, parse_format, quantize_model
from logquant.coverage import FLOAT_REASONS_ATTR
from logquant.fold import fold_batchnorm

sys.path.insert(0, os.path.dirname(__file__))
from conftest import require  # noqa: E402

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.Linear)
LAYER_CALLS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                         F.conv_transpose3d, F.linear})

# timm architectures by family (a model is listed under the family it was picked for)
TIMM_FAMILIES: dict[str, list[str]] = {
    "plain": ["vgg11", "repvgg_a0", "darknet17", "mobileone_s0"],
    "residual": ["resnet18", "resnet26", "resnet50d", "resnet10t", "gernet_s", "dla34",
                 "res2net50_14w_8s", "resnetblur18"],
    "grouped": ["resnext26ts", "regnetx_002", "resnest14d", "skresnet18", "cspresnext50"],
    "depthwise": ["mobilenetv2_050", "mobilenetv3_small_050", "mnasnet_050", "efficientnet_b0",
                  "efficientnetv2_rw_t", "ghostnet_050", "lcnet_050", "hardcorenas_a",
                  "tinynet_a", "fbnetc_100", "spnasnet_100", "mixnet_s", "rexnet_100",
                  "xception41", "mobilenetv4_conv_small", "repghostnet_050", "convnext_atto",
                  "hgnetv2_b0"],
    "squeeze-excite": ["seresnext26d_32x4d", "regnety_002", "legacy_seresnet18",
                       "eca_resnet33ts", "gcresnet33ts", "ese_vovnet19b_slim"],
    "same-padding (TF ports)": ["tf_efficientnet_b0", "tf_mobilenetv3_small_100",
                                "tf_mixnet_s", "tf_efficientnetv2_b0"],
    "weight-standardized": ["nf_resnet26", "nf_regnet_b0", "nfnet_l0", "resnetv2_50x1_bit"],
    "dense/concat": ["densenet121", "dpn48b", "selecsls42b", "hrnet_w18_small",
                     "inception_v3", "cspresnet50", "cspdarknet53", "vovnet39a"],
    "conv + attention": ["mobilevit_xxs", "mobilevitv2_050", "botnet26t_256"],
}
TIMM_MODELS = [m for models in TIMM_FAMILIES.values() for m in models]

# input side where the default (64 px) does not suit the architecture; torchvision's ViTs
# are built for it (a few patches: the layers and their formats are those of 224 px)
INPUT_SIZE = {"tv/inception_v3": 80, "tv/maxvit_t": 224, "tv/vit_b_16": 32, "tv/vit_l_16": 32,
              "tv/vit_h_14": 28, "timm/inception_v3": 80, "timm/botnet26t_256": 256}
# models whose layers may legitimately stay float (attention that uses a layer's weight
# directly); everywhere else a float row is a failure
ATTENTION_TV = ("vit_", "swin_", "maxvit_")
ATTENTION_TIMM = set(TIMM_FAMILIES["conv + attention"])
# layers that never run in eval mode, so they stay float ("never ran on the calibration
# data"): the auxiliary classifiers torchvision's googlenet and inception_v3 build when
# weights=None (used in training only)
EVAL_UNUSED = {"tv/googlenet": ("aux1.", "aux2."), "tv/inception_v3": ("AuxLogits.",)}
# Formats cycled over the models so that every kind of format is exercised.
CONFIGS = [
    dict(conv_weights="log4", fc_weights="log4", acts="log4"),
    dict(conv_weights="logsqrt2-5", fc_weights="log4", acts="lin5"),
    dict(conv_weights="lin5", fc_weights="lin5", acts="logsqrt2-5"),
    dict(conv_weights="log3", fc_weights="log4-linround", acts="log3"),
]
BIG = 20_000_000  # parameters: above this, FSRs by "max" (the mse search costs 10 passes)


def all_models() -> list[str]:
    """Every model id: "tv/NAME" (torchvision classification) and "timm/NAME"."""
    try:
        import torchvision
    except ImportError:  # the test itself then skips, or fails in CI (conftest.require)
        return ["tv/torchvision-missing"] + [f"timm/{n}" for n in TIMM_MODELS]
    names = torchvision.models.list_models(module=torchvision.models)
    return [f"tv/{n}" for n in sorted(names)] + [f"timm/{n}" for n in TIMM_MODELS]


def family_of(model_id: str) -> str:
    source, name = model_id.split("/")
    if source == "tv":
        return "torchvision"
    return next(f for f, models in TIMM_FAMILIES.items() if name in models)


def may_have_float_layers(model_id: str) -> bool:
    source, name = model_id.split("/")
    return name.startswith(ATTENTION_TV) if source == "tv" else name in ATTENTION_TIMM


def _seed(model_id: str) -> int:
    return zlib.crc32(model_id.encode())


def build(model_id: str) -> nn.Module:
    """The model with seeded random weights and slightly random BatchNorm statistics."""
    source, name = model_id.split("/")
    torch.manual_seed(_seed(model_id))
    if source == "tv":
        import torchvision

        # 10 classes keep the classifiers of giant models small
        extra = {"image_size": INPUT_SIZE.get(model_id, 64)} if name.startswith("vit_") else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
    generator = torch.Generator().manual_seed(_seed(model_id) + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LAYER_TYPES) and not module.weight.any():
                # zero-initialized (torchvision ViT's head): the output would be constant
                # and the comparison with the reference trivial
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, fan_in ** -0.5, generator=generator)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                    module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                if module.affine:
                    module.weight.copy_(1 + 0.1 * torch.randn(shape, generator=generator))
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def config_for(model_id: str, model: nn.Module) -> QuantConfig:
    formats = CONFIGS[_seed(model_id) % len(CONFIGS)]
    big = sum(p.numel() for p in model.parameters()) > BIG
    return QuantConfig(**formats, weight_fsr="max" if big else "mse",
                       act_fsr="max" if big else "mse", unsupported="float")


class _ReferenceCall(TorchFunctionMode):
    """Quantizes argument 0 (input) and 1 (weight) of the conv/linear calls made while it
    is active with the formats' functional ``quantize``; counts them."""

    def __init__(self, weight_format, input_format):
        super().__init__()
        self.weight_format, self.input_format = weight_format, input_format
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in LAYER_CALLS:
            self.calls += 1
            args = list(args)
            if len(args) < 2:  # input / weight given by keyword
                args = [args[0] if args else kwargs.pop("input"), kwargs.pop("weight")] + args[2:]
            if self.input_format is not None:
                args[0] = self.input_format.quantize(args[0])
            if self.weight_format is not None:
                args[1] = self.weight_format.quantize(args[1])
        return func(*args, **kwargs)


def reference_model(model: nn.Module, rows: list[dict]) -> tuple[nn.Module, list]:
    """The BatchNorm-folded float model computing like ``rows`` say, by hooks of its own."""
    reference = fold_batchnorm(model)
    active: list[_ReferenceCall] = []
    problems: list[str] = []

    def push(weights, inputs):
        def hook(module, args):
            mode = _ReferenceCall(weights, inputs)
            active.append(mode)
            mode.__enter__()
        return hook

    def pop(name):
        def hook(module, args, output):
            mode = active.pop()
            mode.__exit__(None, None, None)
            if mode.calls != 1:
                problems.append(f"{name}: {mode.calls} conv/linear calls in one forward")
        return hook

    for row in rows:
        if row["status"] != "quantized":
            continue
        module = reference.get_submodule(row["layer"])
        module.register_forward_pre_hook(push(parse_format(row["weights"]),
                                              parse_format(row["input"])))
        module.register_forward_hook(pop(row["layer"]))
    return reference, problems


def check_model(model_id: str, batch: int = 2) -> dict:
    """Quantize one zoo model and check it; returns its counts (raises AssertionError)."""
    start = time.perf_counter()
    model = build(model_id)
    size = INPUT_SIZE.get(model_id, 64)
    generator = torch.Generator().manual_seed(_seed(model_id) + 2)
    calibration = torch.randn(batch, 3, size, size, generator=generator)
    x = torch.randn(batch, 3, size, size, generator=generator)
    instances = sum(isinstance(m, LAYER_TYPES) for m in model.modules())
    classes = [type(m) for m in model.modules()]
    config = config_for(model_id, model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_model(model, config, [calibration])
        rows = describe(q)
        with torch.no_grad():
            out = q(x)
    del q  # giant models: at most two copies of the weights at a time

    # untouched: the same classes, and the weights of a fresh build (build is deterministic;
    # a fresh build rather than a snapshot keeps one copy fewer of vit_h_14 in memory)
    assert [type(m) for m in model.modules()] == classes, f"{model_id}: classes changed"
    assert not hasattr(model, FLOAT_REASONS_ATTR) and not model.training
    fresh = build(model_id).state_dict()
    after = model.state_dict()
    assert after.keys() == fresh.keys() and all(
        torch.equal(fresh[k], after[k]) for k in fresh), f"{model_id}: float model changed"
    del fresh, after

    floats = [r for r in rows if r["status"] != "quantized"]
    assert len(rows) == instances, \
        f"{model_id}: describe lists {len(rows)} layers, the model has {instances}"
    assert rows.quantized == instances - len(floats)
    assert all(r["reason"] for r in floats), f"{model_id}: a float layer without reason"
    if not may_have_float_layers(model_id):
        unexpected = [(r["layer"], r["reason"]) for r in floats
                      if not (r["layer"].startswith(EVAL_UNUSED.get(model_id, ()))
                              and r["reason"] == "never ran on the calibration data")]
        assert not unexpected, f"{model_id}: float layers {unexpected}"

    reference, problems = reference_model(model, rows)
    with torch.no_grad():
        expected = reference(x)
    assert not problems, f"{model_id}: {problems[:3]}"
    assert torch.isfinite(expected).all(), f"{model_id}: non-finite reference output"
    assert expected.unique().numel() > 1, f"{model_id}: constant output, a weak comparison"
    assert torch.equal(out, expected), \
        f"{model_id}: max |quantized - reference| = {float((out - expected).abs().max())}"
    kinds = Counter(f"{re.sub(r'[0-9]+', 'N', r['layer'])} ({r['type']}): {r['reason']}"
                    for r in floats)  # one note per kind of float layer, with its count
    notes = [f"{count} x {kind}" for kind, count in sorted(kinds.items())]
    batchnorms = Counter(type(m).__name__ for m in reference.modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {"model": model_id, "family": family_of(model_id), "total": instances,
            "quantized": rows.quantized, "float": len(floats), "notes": notes,
            "float_kinds": dict(kinds), "batchnorm_classes": dict(batchnorms),
            "conv": sum(r["kind"] == "conv" for r in rows),
            "linear": sum(r["kind"] == "fc" for r in rows),
            "batchnorm_left": sum(batchnorms.values()), "config": config.to_dict(),
            "warnings": sorted({str(w.message)[:120] for w in caught}),
            "seconds": round(time.perf_counter() - start, 1), "input": size}


def _print(result: dict) -> None:
    print(f"\n{result['model']}: quantized {result['quantized']} of {result['total']} "
          f"conv/linear ({result['conv']} conv, {result['linear']} linear), "
          f"{result['float']} float, {result['batchnorm_left']} BatchNorm left, "
          f"{result['seconds']} s")


def quick_sample() -> list[str]:
    """A fixed sample: one torchvision model and five timm models of different families."""
    import random

    rng = random.Random(2016)
    families = sorted(f for f in TIMM_FAMILIES if f != "conv + attention")
    picked = rng.sample(families, 5)
    return ["tv/" + rng.choice(["resnet18", "mobilenet_v3_small", "squeezenet1_1"])] + [
        "timm/" + rng.choice(TIMM_FAMILIES[f]) for f in picked]


@pytest.fixture(scope="module", autouse=True)
def _zoo_packages():
    require("torchvision")
    require("timm")


@pytest.mark.parametrize("model_id", quick_sample())
def test_zoo_sample(model_id):
    _print(check_model(model_id))


@pytest.mark.slow
@pytest.mark.parametrize("model_id", all_models())
def test_zoo_all(model_id):
    _print(check_model(model_id))
