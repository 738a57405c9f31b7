"""The integer engine is bit-exact: fast path == literal shift-add path == float64
simulation, on the reference model with real Fashion-MNIST images and on networks that use
every op and format the engine runs."""

import pytest
import torch
from torch import nn

from logquant import lqz
from logquant.config import QuantConfig
from logquant.engine import Engine
from logquant.export import build_lqz, quantize_for_export
from logquant.lqz import LqzError
from logquant.models import load_model
from logquant.simulate import simulate
from user_models import Residual, export


def assert_same(a, b):
    assert torch.equal(a.logits, b.logits) and a.exponent == b.exponent
    assert a.codes.keys() == b.codes.keys()
    for name in a.codes:
        assert torch.equal(a.codes[name], b.codes[name]), name
    for name in a.sums:
        assert torch.equal(a.sums[name], b.sums[name]), name


def assert_matches_simulation(network, result, images):
    sim = simulate(network, images)
    for name, codes in sim.codes.items():
        mismatches = int((result.codes[name].long() != codes.long()).sum())
        assert mismatches == 0, f"{name}: {mismatches} codes differ from float64"
    assert torch.equal(result.values(), sim.logits)


def test_reference_model_fast_literal_and_float64_agree(refcnn_export, fashion):
    network, _, _ = refcnn_export
    images = fashion.test.images[:3]
    fast = Engine(network).run(images, trace=True)
    assert_same(fast, Engine(network, literal=True).run(images, trace=True))
    assert_matches_simulation(network, fast, images)


def test_reference_model_matches_float64_and_float32_on_2000_test_images(refcnn_export,
                                                                          fashion):
    network, qmodel, _ = refcnn_export
    images = fashion.test.images[:2000]
    result = Engine(network).run(images, trace=True)
    assert_matches_simulation(network, result, images)
    with torch.no_grad():  # the float32 PyTorch model of the same network
        offset = torch.tensor(network.ops[0]["offset"], dtype=torch.float32).view(1, -1, 1, 1)
        float32 = qmodel(images.float() - offset).double()
    assert (float32.argmax(1) == result.logits.argmax(1)).float().mean() > 0.999
    assert (float32 - result.values()).abs().max() < 1e-3


@pytest.mark.slow
def test_whole_test_set_has_zero_mismatches(refcnn_export, fashion):
    network, _, _ = refcnn_export
    engine = Engine(network)
    correct = 0
    for start in range(0, len(fashion.test), 1000):
        images = fashion.test.images[start:start + 1000]
        result = engine.run(images, trace=True)
        assert_matches_simulation(network, result, images)
        correct += int((result.logits.argmax(1) == fashion.test.labels[start:start + 1000])
                       .sum())
    assert correct / len(fashion.test) > 0.90


@pytest.mark.parametrize("spec_w,spec_a", [
    ("log4", "log4"), ("log5", "log3"), ("lin4", "log4"), ("log4", "lin6"), ("lin5", "lin5"),
    ("log4-linround", "log4-linround"), ("logsqrt2-4", "log4"), ("log3", "logsqrt2-4"),
])
def test_every_op_and_format_fast_equals_literal(spec_w, spec_a, fashion):
    torch.manual_seed(1)
    network = export(Residual().eval(), spec_w, spec_a, fashion)
    images = fashion.test.images[:4]
    fast = Engine(network).run(images, trace=True)
    assert_same(fast, Engine(network, literal=True).run(images, trace=True))
    if "sqrt2" not in spec_w + spec_a:  # sqrt2 sums are combined with P fraction bits
        assert_matches_simulation(network, fast, images)


def test_sqrt2_layers_give_the_exactly_rounded_codes(fashion):
    """Base sqrt2: the engine's integer sums A + B sqrt2, combined with P fraction bits,
    give the code of the exact value (checked in 80-digit decimals) wherever the float64
    simulation disagrees (it rounds sqrt2, so exact ties such as A 2^L = 0.5 with B = 0
    fall on the wrong side there) and on a random sample of all other outputs."""
    from decimal import Decimal, localcontext

    from logquant.engine import literal
    from reference_formats import RefFormat

    config = QuantConfig(conv_weights="logsqrt2-4", fc_weights="log4", acts="lin3")
    qmodel, offset = quantize_for_export(load_model("refcnn"), config,
                                         fashion.val.images[:500], fashion.val.mean,
                                         fashion.val.std, num_batches=2)
    network = build_lqz(qmodel, offset, [1, 28, 28])
    engine = Engine(network)
    images = fashion.test.images[:100]
    result = engine.run(images, trace=True)
    sim = simulate(network, images)
    quantize_of = {}  # sqrt2 layer output -> the quantize op reading it through a ReLU
    for op in network.ops:
        if op["op"] == "quantize":
            source = next(o for o in network.ops if o["out"] == op["in"])
            if source["op"] == "relu" and source["in"] in engine.plan.layers and \
                    engine.plan.layers[source["in"]].sqrt2:
                quantize_of[source["in"]] = op
    checked = 0
    generator = torch.Generator().manual_seed(0)
    for out, op in quantize_of.items():
        layer = engine.plan.layers[out]
        codes, _, bias = engine._weights[out]
        even, odd = literal.layer_sums(layer, result.inputs[out], codes)
        even = even + bias.view(1, -1, 1, 1)
        fmt = engine.plan.values[op["out"]].fmt
        ref = RefFormat("linear", fmt.bits, fmt.fsr, fmt.signed)
        got = result.codes[op["out"]].long()
        differ = (got != sim.codes[op["out"]].long()).nonzero().tolist()
        sample = torch.randint(got.numel(), (500,), generator=generator).tolist()
        positions = differ + [list(torch.unravel_index(torch.tensor(i), got.shape))
                              for i in sample]
        with localcontext() as ctx:
            ctx.prec = 80
            root2, unit = Decimal(2).sqrt(), Decimal(2) ** layer.exponent
            for n, c, h, w in positions:
                value = (Decimal(int(even[n, c, h, w])) + Decimal(int(odd[n, c, h, w])) * root2)
                value = max(value * unit, Decimal(0))  # the ReLU
                assert int(got[n, c, h, w]) == ref.magnitude_index(value), (op["out"], n, c, h,
                                                                           w)
                checked += 1
    assert len(quantize_of) >= 4 and checked >= 2000


def test_signed_activations_and_sign_magnitude_maxpool(fashion):
    """No ReLU before a quantizer: activations become signed; max-pooling compares
    sign-magnitude codes through their order."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.MaxPool2d(2),
                          nn.Conv2d(6, 6, 3), nn.Flatten(), nn.Linear(6 * 12 * 12, 10)).eval()
    network = export(model, "log4", "log4", fashion)
    assert any(op["op"] == "quantize" and "s@" in op["format"] for op in network.ops)
    images = fashion.test.images[:8]
    fast = Engine(network).run(images, trace=True)
    assert_same(fast, Engine(network, literal=True).run(images, trace=True))
    assert_matches_simulation(network, fast, images)


def test_narrow_accumulators_saturate_and_count_overflows(refcnn_export, fashion):
    network, _, _ = refcnn_export
    images = fashion.test.images[:16]
    exact = Engine(network).run(images)
    widest = max(layer.acc_bits for layer in Engine(network).plan.layers.values())
    assert Engine(network, acc_bits=widest).run(images).overflows == {}
    assert torch.equal(Engine(network, acc_bits=widest).run(images).logits, exact.logits)
    narrow = Engine(network, acc_bits=widest - 8).run(images)
    assert sum(narrow.overflows.values()) > 0
    limit = 1 << (widest - 9)
    assert int(narrow.logits.max()) <= limit - 1 and int(narrow.logits.min()) >= -limit
    literal = Engine(network, acc_bits=widest - 8, literal=True).run(images)
    assert torch.equal(narrow.logits, literal.logits) and narrow.overflows == literal.overflows


def test_compiled_and_eager_kernels_and_thread_counts_agree(refcnn_export, fashion,
                                                            monkeypatch):
    network, _, _ = refcnn_export
    images = fashion.test.images[:64]
    reference = Engine(network).run(images, trace=True)
    monkeypatch.setenv("LOGQUANT_COMPILE", "0")
    assert_same(reference, Engine(network).run(images, trace=True))
    monkeypatch.delenv("LOGQUANT_COMPILE")
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert_same(reference, Engine(network).run(images, trace=True))
    finally:
        torch.set_num_threads(threads)


def test_engine_rejects_images_of_the_wrong_kind(refcnn_export):
    engine = Engine(refcnn_export[0])
    for bad in (torch.zeros(2, 1, 28, 28), torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
                torch.zeros(2, 28, 28, dtype=torch.uint8)):
        with pytest.raises(LqzError, match="uint8 images of shape"):
            engine.run(bad)


def test_loaded_file_runs_like_the_exported_network(refcnn_export, fashion):
    network, _, path = refcnn_export
    images = fashion.test.images[:32]
    assert_same(Engine(network).run(images, trace=True),
                Engine(lqz.load(path)).run(images, trace=True))
