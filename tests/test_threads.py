"""One quantized model called from many threads gives the serial results."""

import threading

import pytest
import torch

from logquant import QuantConfig, quantize_model
from logquant.models import RefCNN

THREADS, CALLS = 8, 50


def _hammer(model, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each thread calls ``model`` CALLS times on its own inputs, all starting together."""
    results = [[None] * CALLS for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for i in range(CALLS):
                    results[t][i] = model(inputs[(t + i) % len(inputs)])
        except Exception as exc:  # reported below, with the thread
            errors.append((t, exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_concurrent_calls_equal_serial_calls(compiled):
    torch.manual_seed(0)
    calibration = torch.randn(64, 1, 28, 28)
    qmodel = quantize_model(RefCNN().eval(), QuantConfig(conv_weights="log4", fc_weights="log4",
                                                          acts="log4"), calibration)
    # batches large enough that the formats' fused (compiled) kernels run, distinct per call
    inputs = [torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(i))
              for i in range(THREADS + 3)]
    model = torch.compile(qmodel) if compiled else qmodel
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results = _hammer(model, inputs)
    differ = sum(not torch.equal(results[t][i], serial[(t + i) % len(inputs)])
                 for t in range(THREADS) for i in range(CALLS))
    assert differ == 0, f"{differ} of {THREADS * CALLS} concurrent calls differ from serial"


def test_scratch_reuse_is_exact_across_modes_and_sizes():
    """Layer inputs are quantized into a per-thread reusable buffer in inference: results
    equal the allocating path whatever the order of sizes, no_grad / inference_mode, and
    autograd never sees the buffer."""
    torch.manual_seed(1)
    qmodel = quantize_model(RefCNN().eval(), QuantConfig(acts="log4"), torch.randn(32, 1, 28, 28))
    inputs = [torch.randn(n, 1, 28, 28) for n in (8, 2, 16, 8)]
    with torch.enable_grad():  # the allocating path: autograd records, no scratch
        expected = [qmodel(x).detach() for x in inputs]
    for context in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with context():
            got = [qmodel(x) for x in inputs]
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    x = torch.randn(8, 1, 28, 28, requires_grad=True)
    qmodel(x).sum().backward()  # the quantized inputs autograd saved were not overwritten
    assert x.grad is not None and torch.isfinite(x.grad).all()
