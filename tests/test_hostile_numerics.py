"""Hostile tensors and data: each case gives a defined, documented result or one clear
error, never a silent wrong number.

| case | result |
|---|---|
| NaN / inf in weights or buffers | LogquantError naming the tensor (PTQ, QAT, export, CLI) |
| all-zero layer | zero codes; the engine equals the float64 simulation |
| subnormal values | exact per docs/FORMATS.md (vs the decimal reference); a layer of them
  quantizes to zero with a QuantizationWarning, and export refuses the accumulator width |
| one huge outlier | FSR covers it (max) and the rest vanish: QuantizationWarning; a fixed
  FSR saturates the outlier to the largest level |
| wrong input shape / dtype / channels | engine: LqzError; quantized model: PyTorch's error |
| empty calibration data / dataset / split | LogquantError |
| NaN model outputs | LogquantError from evaluate |
| one calibration image | a working model with in-range FSRs |
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logquant import QuantConfig, quantize_model
from logquant.cli import main
from logquant.convert import describe
from logquant.engine import Engine
from logquant.errors import LogquantError, QuantizationWarning
from logquant.evaluate import evaluate
from logquant.export import build_lqz, quantize_for_export
from logquant.formats import FSR_MAX, FSR_MIN, parse_format
from logquant.io import save_weights
from logquant.lqz import LqzError
from logquant.models import load_model
from logquant.qat import prepare_qat
from logquant.simulate import simulate
from reference_formats import RefFormat

LOG4 = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")


def _model(edit=None):
    model = load_model("refcnn")
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return model


def _export(model, fashion, config=LOG4, count=500):
    qmodel, offset = quantize_for_export(model, config, fashion.val.images[:count],
                                         fashion.val.mean, fashion.val.std,
                                         num_batches=max(1, count // 250))
    return build_lqz(qmodel, offset, [1, 28, 28])


def _conv0(model) -> torch.Tensor:
    return model.features[0].weight


@pytest.mark.parametrize("where", ["weight", "buffer"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_refused_by_every_entry_point(where, value, fashion):
    def poison(model):
        tensor = _conv0(model) if where == "weight" else model.features[4].running_var
        tensor.view(-1)[3] = value

    name = "features.0.weight" if where == "weight" else "features.4.running_var"
    calibration = fashion.val.batches(250)
    for build in (lambda m: quantize_model(m, LOG4, calibration, num_batches=1),
                  lambda m: prepare_qat(m, LOG4, calibration, num_batches=1),
                  lambda m: _export(m, fashion)):
        with pytest.raises(LogquantError, match=name):
            build(_model(poison))


def test_cli_refuses_a_checkpoint_with_nan_weights(capsys, small_fashion_dir, tmp_path):
    model = _model(lambda m: _conv0(m).view(-1)[0].fill_(float("nan")))
    save_weights(model, tmp_path / "nan.safetensors")
    code = main(["eval", "--data-dir", str(small_fashion_dir), "--checkpoint",
                 str(tmp_path / "nan.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "features.0.weight holds 1 NaN" in err


def test_all_zero_layer_gives_zero_codes_and_an_exact_engine(fashion):
    model = _model(lambda m: m.features[3].weight.zero_())
    network = _export(model, fashion)
    op = next(o for o in network.layer_ops() if o["name"] == "features.3")
    zero_code = int(network.weight_format(op).encode(torch.zeros(1))[0])
    assert bool((network.weights[op["weight"]] == zero_code).all())
    images = fashion.test.images[:64]
    result = Engine(network).run(images, trace=True)
    sim = simulate(network, images)
    assert torch.equal(result.values(), sim.logits)
    for name, codes in sim.codes.items():
        assert torch.equal(result.codes[name].long(), codes.long()), name


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.floats(min_value=2.0**-149, max_value=2.0**-126, width=32, allow_subnormal=True),
       st.sampled_from(["log8", "log8s", "logsqrt2-8s", "log8-linround", "lin8s"]),
       st.booleans())
def test_subnormal_values_round_exactly(value, spec, negative):
    """At FSR -64 an 8-bit log format reaches 2^-319, far into float32's subnormals."""
    fmt = parse_format(spec).with_fsr(FSR_MIN)
    kind = {"log": "log2", "logs": "log2", "logsqrt2-s": "logsqrt2", "log-linround": "log2",
            "lins": "linear"}[spec.replace("8", "")]
    ref = RefFormat(kind, 8, FSR_MIN, fmt.signed, "linear" if "linround" in spec else "log")
    x = -value if negative else value
    tensor = torch.tensor([x], dtype=torch.float32)
    assert int(fmt.encode(tensor)[0]) == ref.encode(x), (spec, x)
    # the level itself, rounded to float32 (sqrt2 levels are irrational)
    assert float(fmt.quantize(tensor)[0]) == float(np.float32(ref.quantize(x))), (spec, x)


def test_a_layer_of_subnormal_weights_vanishes_with_a_warning_and_export_refuses(fashion):
    model = _model(lambda m: _conv0(m).copy_(torch.full_like(_conv0(m), 1e-40)))
    with pytest.warns(QuantizationWarning, match="features.0: 100.0 % .* below the smallest"):
        qmodel = quantize_model(model, LOG4, fashion.val.batches(250), num_batches=1)
    assert bool((qmodel.features[0].weight == 0).all())
    with pytest.raises(LqzError, match="features.0.*accumulator"), \
            pytest.warns(QuantizationWarning):
        _export(model, fashion)


def test_one_huge_outlier_warns_and_a_fixed_fsr_saturates_it(fashion):
    model = _model(lambda m: _conv0(m).view(-1)[3].fill_(1e30))
    config = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4",
                         weight_fsr="max")
    with pytest.warns(QuantizationWarning, match="features.0: 99.* an outlier"):
        qmodel = quantize_model(model, config, fashion.val.batches(250), num_batches=1)
    assert describe(qmodel)[0]["weights"] == f"log4s@fsr{FSR_MAX}"  # clamped, covers it
    fixed = QuantConfig(conv_weights="log4s@fsr0", fc_weights="log4", acts="log4")
    qfixed = quantize_model(model, fixed, fashion.val.batches(250), num_batches=1)
    top = float(parse_format("log4s@fsr0").levels().max())
    folded = qfixed.features[0].weight.detach().view(-1)
    assert abs(float(folded[3])) == top  # saturated to the largest level
    assert float((folded != 0).float().mean()) > 0.5  # the other weights survive


def test_wrong_inputs_get_clear_errors(refcnn_export, fashion):
    network, qmodel, _ = refcnn_export
    engine = Engine(network)
    for bad in (torch.zeros(2, 1, 28, 28),  # float, not uint8 pixels
                torch.zeros(2, 3, 28, 28, dtype=torch.uint8),  # channels
                torch.zeros(2, 1, 32, 32, dtype=torch.uint8),  # size
                torch.zeros(28, 28, dtype=torch.uint8)):  # no batch and channel dims
        with pytest.raises(LqzError, match="uint8 images of shape \\(N, 1, 28, 28\\)"):
            engine.run(bad)
    with pytest.raises(RuntimeError, match="channels"):
        qmodel(torch.zeros(2, 3, 28, 28))


def test_empty_inputs_are_errors_not_zero_accuracy(fashion):
    with pytest.raises(LogquantError, match="calibration data is empty"):
        quantize_model(_model(), LOG4, [])
    with pytest.raises(LogquantError, match="holds no images"):
        evaluate(_model(), fashion.test.subset(torch.arange(0)))


def test_empty_test_split_on_the_command_line(capsys, small_fashion_dir, tmp_path):
    from conftest import write_idx
    from logquant.data import FASHION_FILES

    for part in ("train", "test"):
        for stem in FASHION_FILES[part]:
            (tmp_path / f"{stem}.gz").write_bytes((small_fashion_dir / f"{stem}.gz")
                                                  .read_bytes())
    images, labels = FASHION_FILES["test"]
    write_idx(tmp_path / f"{images}.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / f"{labels}.gz", np.zeros(0, dtype=np.uint8))
    code = main(["eval", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "holds no images" in err and err.count("\n") == 1


def test_nan_outputs_are_an_error_not_an_accuracy(fashion):
    model = _model()
    model.classifier[4].register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(LogquantError, match="outputs contain NaN"):
        evaluate(model, fashion.test.subset(torch.arange(100)))


def test_one_calibration_image_gives_a_working_model(fashion):
    one = fashion.val.images[:1]
    qmodel = quantize_model(_model(), LOG4, fashion.val.normalize(one.float()))
    for row in describe(qmodel)[1:]:
        fsr = parse_format(row["input"]).fsr
        assert FSR_MIN <= fsr <= FSR_MAX
    assert evaluate(qmodel, fashion.test.subset(torch.arange(1000))).top1 > 80
    network = _export(_model(), fashion, count=1)
    images = fashion.test.images[:32]
    assert torch.equal(Engine(network).run(images).values(), simulate(network, images).logits)


def test_cli_prints_the_warning_as_one_line(capsys, small_fashion_dir, tmp_path):
    model = _model(lambda m: _conv0(m).view(-1)[3].fill_(1e30))
    save_weights(model, tmp_path / "outlier.safetensors")
    code = main(["eval", "--data-dir", str(small_fashion_dir), "--checkpoint",
                 str(tmp_path / "outlier.safetensors"), "--weights", "log4", "--acts", "log4",
                 "--weight-fsr", "max", "--json"])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if "features.0" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: features.0: 99."), err
