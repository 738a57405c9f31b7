"""The quantized model in standard runtimes: torch.compile without graph breaks,
torch.export, and ONNX run by onnxruntime on the real test set."""

import numpy as np
import pytest
import torch

from conftest import require
from logquant import QuantConfig, quantize_model
from logquant.cli import main
from logquant.models import RefCNN, load_model

LOG4 = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    return quantize_model(RefCNN().eval(), LOG4, torch.randn(32, 1, 28, 28))


def test_torch_compile_sees_one_graph(qmodel):
    import torch._dynamo as dynamo

    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        explained = dynamo.explain(qmodel)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert torch.equal(torch.compile(qmodel, fullgraph=True)(x), qmodel(x))


def test_torch_export_gives_the_same_outputs(qmodel):
    x = torch.randn(8, 1, 28, 28)
    program = torch.export.export(qmodel, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.view.dtype" not in targets
    probe = torch.randn(8, 1, 28, 28)  # the program is specialized to the example's shape
    with torch.no_grad():
        assert torch.equal(program.module()(probe), qmodel(probe))


def test_onnx_export_runs_in_onnxruntime_on_the_whole_test_set(fashion, tmp_path, capsys):
    """`logquant export --format onnx` of the bundled model (log4 weights and activations),
    run by onnxruntime on all 10,000 Fashion-MNIST test images against PyTorch."""
    ort = require("onnxruntime")
    require("onnxscript")
    path = tmp_path / "refcnn-log4.onnx"
    assert main(["export", "--format", "onnx", "--weights", "log4", "--acts", "log4",
                 "--calib-batches", "2", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "quantized 7 of 7 conv/linear layers" in out
    reference = quantize_model(load_model("refcnn").eval(), LOG4,
                               fashion.val.batches(500), num_batches=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours, theirs = [], []
    with torch.no_grad():
        for x, _ in fashion.test.batches(1000):
            ours.append(reference(x))
            theirs.append(torch.from_numpy(session.run(None, {name: x.numpy()})[0]))
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    assert ours.shape == theirs.shape == (10_000, 10)
    # The two runtimes sum the convolutions in different orders (float32 rounding), and a
    # sum that lands next to a level boundary can round to the neighbouring level; count
    # such images instead of hiding them under a tolerance.
    close = torch.isclose(theirs, ours, rtol=1e-4, atol=1e-4).all(1)
    same_top1 = theirs.argmax(1) == ours.argmax(1)
    print(f"onnxruntime vs PyTorch: {int(close.sum())} of 10000 images with all logits "
          f"within 1e-4, {int(same_top1.sum())} with the same top-1")
    # On the machine where this was written all 10,000 agreed in top-1 (9,997 within 1e-4);
    # on another CPU of the same kind 9,999 (9,990 within 1e-4): the float32 summation order
    # is the CPU's, and one level flip in an early layer can move a near-tie. A bug moves
    # hundreds; allow a handful and print the margins of those that moved.
    differ = (~same_top1).nonzero().flatten()
    margin = ours[differ].topk(2, dim=1).values.diff(dim=1).abs().flatten()
    print(f"top-1 changed on images {differ.tolist()}, PyTorch top-2 margins "
          f"{[round(float(m), 4) for m in margin]}")
    assert len(differ) <= 5, f"{len(differ)} images change top-1 between the runtimes"
    assert int(close.sum()) >= 9_990
    labels = fashion.test.labels.numpy()
    acc = float(np.mean(theirs.argmax(1).numpy() == labels))
    assert acc > 0.85
