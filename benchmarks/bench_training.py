"""Training step time: log 5-bit weights + activations + errors vs float, side by side.

    python benchmarks/bench_training.py [--repeats 20] [--batch 128]

Both models are the reference CNN with the same initial weights and the same batch; each
timed step is forward, backward and an SGD update. The order inside each pair alternates
so drifting machine speed hits both alike; the ratio is the median of per-pair ratios.
The last line is the JSON metrics summary (target: at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    from logquant.config import QuantConfig
    from logquant.models import RefCNN
    from logquant.qat import prepare_qat

    torch.manual_seed(0)
    float_model = RefCNN().train()
    config = QuantConfig(conv_weights="log5", fc_weights="log5", acts="log5", grads="log5")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=gen).clamp_min(-0.8)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    quant_model = prepare_qat(float_model, config, [x])

    def stepper(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps = {"float": stepper(float_model), "log5": stepper(quant_model)}
    for _ in range(3):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for i in range(args.repeats):
        for name in (("float", "log5") if i % 2 else ("log5", "float")):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(q / f for q, f in zip(times["log5"], times["float"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"step float {statistics.median(times['float']) * 1e3:7.2f} ms   log5 w+a+errors "
          f"{statistics.median(times['log5']) * 1e3:7.2f} ms   ratio {ratio:.2f}")
    print(json.dumps({"metrics": {"train_step_log5_vs_float": {
        "value": round(ratio, 3), "target": 1.5, "better": "lower"}}}))


if __name__ == "__main__":
    main()
