"""Export: the network captured from the model, normalization folded into the first layer,
and every network the engine cannot run refused at export time, naming the op."""

import pytest
import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.engine import Engine
from logquant.export import build_lqz, fold_normalization, quantize_for_export
from logquant.lqz import LqzError
from logquant.models import load_model
from logquant.simulate import simulate

LOG4 = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")


def test_reference_network_ops_and_codes_between_layers(refcnn_export):
    network, _, _ = refcnn_export
    kinds = [op["op"] for op in network.ops]
    assert kinds[0] == "input" and kinds[-1] == "output"
    assert kinds.count("conv") == 5 and kinds.count("linear") == 2
    assert network.ops[0]["offset"] == [73]  # round(255 * 0.2860)
    produced = {op["out"]: op for op in network.ops}
    for op in network.ops:
        if op["op"] == "maxpool":  # quantizers moved above the pools: pools compare codes
            assert produced[op["in"]]["op"] == "quantize"
        if op["op"] in ("conv", "linear") and op["name"] != "features.0":
            assert produced[op["in"]]["op"] in ("quantize", "maxpool", "flatten")


def test_folded_normalization_keeps_the_float_model(fashion):
    model = load_model("refcnn")
    images = fashion.test.images[:500]
    with torch.no_grad():
        reference = model(fashion.test.normalize(images))
        offset = fold_normalization(model, images[:1].float(), fashion.test.mean,
                                    fashion.test.std)
        folded = model(images.float() - torch.tensor(offset, dtype=torch.float32).view(
            1, -1, 1, 1))
    # exact but for the mean's rounding at zero-padded borders (delta < 0.002 / std)
    assert (folded - reference).abs().max() < 0.05
    assert (folded.argmax(1) == reference.argmax(1)).float().mean() >= 0.998


@pytest.mark.parametrize("layer,name", [(nn.GELU(), "GELU"), (nn.Sigmoid(), "Sigmoid"),
                                        (nn.LayerNorm(16), "LayerNorm")])
def test_an_op_the_engine_cannot_run_is_named_at_export(layer, name, fashion):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 16), layer,
                          nn.Linear(16, 10)).eval()
    qmodel, offset = quantize_for_export(model, LOG4, fashion.val.images[:64],
                                         fashion.val.mean, fashion.val.std, num_batches=1)
    with pytest.raises(LqzError, match=name):
        build_lqz(qmodel, offset, [1, 28, 28])


def test_float_layers_and_missing_formats_are_refused(fashion):
    model = load_model("refcnn")
    images = fashion.val.images[:64]
    skip = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4",
                       skip=("classifier.1",))
    qmodel, offset = quantize_for_export(model, skip, images, fashion.val.mean,
                                         fashion.val.std, num_batches=1)
    with pytest.raises(LqzError, match="classifier.1 has float weights"):
        build_lqz(qmodel, offset, [1, 28, 28])
    weights_only = QuantConfig(conv_weights="log4", fc_weights="log4")
    qmodel, offset = quantize_for_export(model, weights_only, images, fashion.val.mean,
                                         fashion.val.std, num_batches=1)
    with pytest.raises(LqzError, match="features.3 reads float activations"):
        build_lqz(qmodel, offset, [1, 28, 28])
    with pytest.raises(LqzError, match="needs formats"):
        quantize_for_export(model, QuantConfig(), images, fashion.val.mean, fashion.val.std)


def test_formats_too_wide_for_the_engine_are_refused_at_export(fashion):
    config = QuantConfig(conv_weights="log6", fc_weights="log6", acts="log6")
    qmodel, offset = quantize_for_export(load_model("refcnn"), config, fashion.val.images[:64],
                                         fashion.val.mean, fashion.val.std, num_batches=1)
    with pytest.raises(LqzError, match="bits"):
        Engine(build_lqz(qmodel, offset, [1, 28, 28]))


def test_quantization_aware_model_exports_with_its_own_formats(fashion):
    from logquant.qat import prepare_qat
    from user_models import tiny_cnn_plain

    torch.manual_seed(0)
    model = prepare_qat(tiny_cnn_plain(), LOG4, fashion.val.batches(64), num_batches=2)
    model.train()
    with torch.no_grad():  # one step's worth of FSR tracking, as training would leave it
        model(fashion.val.normalize(fashion.val.images[:64]))
    model.eval()
    qmodel, offset = quantize_for_export(model, None, fashion.val.images[:64],
                                         fashion.val.mean, fashion.val.std)
    network = build_lqz(qmodel, offset, [1, 28, 28])
    quantize_ops = [op for op in network.ops if op["op"] == "quantize"]
    assert [op["format"].split("@")[0] for op in quantize_ops] == ["log4"]
    images = fashion.test.images[:16]
    result = Engine(network).run(images, trace=True)
    assert torch.equal(result.values(), simulate(network, images).logits)
    with pytest.raises(LqzError, match="carries its formats"):
        quantize_for_export(model, LOG4, images, fashion.val.mean, fashion.val.std)
