"""save_quantized / load_quantized: a quantized model kept without recalibration, and a
file that does not fit refused naming the difference."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from logquant import QuantConfig, describe, load_quantized, quantize_model, save_quantized
from logquant.errors import LogquantError
from logquant.models import RefCNN
from logquant.persist import QuantizedFileError, _digest

CONFIG = QuantConfig(conv_weights="logsqrt2-5", fc_weights="log4", acts="log4",
                     skip=("classifier.4",))


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = RefCNN().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics: folding is part of it
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _model()
    qmodel = quantize_model(model, CONFIG, torch.randn(32, 1, 28, 28))
    path = tmp_path_factory.mktemp("q") / "refcnn-q.safetensors"
    save_quantized(qmodel, path)
    return model, qmodel, path


def test_round_trip_is_bit_identical_without_calibration(saved):
    model, qmodel, path = saved
    loaded = load_quantized(_model(), path)  # the same architecture, any float weights
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert list(describe(loaded)) == list(describe(qmodel))
    assert loaded.logquant_config == CONFIG
    assert describe(loaded)[-1]["reason"] == "skipped by pattern 'classifier.4'"


def test_parametrized_and_subclassed_layers_round_trip(tmp_path):
    class Std(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    def build():
        torch.manual_seed(3)
        net = nn.Sequential(Std(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                            nn.Linear(4 * 24 * 24, 3))
        torch.nn.utils.parametrizations.weight_norm(net[2])
        return net.eval()

    x = torch.randn(8, 1, 28, 28)
    qmodel = quantize_model(build(), QuantConfig(conv_weights="log4", fc_weights="lin4",
                                                 acts="log4"), x)
    save_quantized(qmodel, tmp_path / "p.safetensors")
    loaded = load_quantized(build(), tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def _rewrite(path, out, edit_meta=None, edit_tensors=None, fix_digest=True):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta.pop("sha256")
    if fix_digest:
        meta["sha256"] = _digest(meta, tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_other_architectures_and_tampered_files_are_refused(saved, tmp_path):
    _, _, path = saved
    wider = nn.Sequential(*RefCNN().children()).eval()  # other layer names
    with pytest.raises(QuantizedFileError, match="the model has torch.float32 \\(256, 576\\)"):
        load_quantized(RefCNN(width=16).eval(), path)
    with pytest.raises(QuantizedFileError, match="another architecture"):
        load_quantized(wider, path)
    with pytest.raises(QuantizedFileError, match="another architecture"):
        load_quantized(nn.Sequential(nn.Conv2d(1, 2, 3)), path)

    def bump_fsr(tensors):
        tensors["features.3.weight_quant.fsr"] += 1

    cases = {
        "checksum mismatch": _rewrite(path, tmp_path / "a.safetensors",
                                      edit_tensors=bump_fsr, fix_digest=False),
        "the metadata says": _rewrite(path, tmp_path / "b.safetensors",
                                      edit_tensors=bump_fsr),
        "not logsqrt2-5s": _rewrite(path, tmp_path / "c.safetensors", edit_tensors=lambda t:
                                    t["features.3.weight"].mul_(1.01)),
        "is a Linear in the model, a Conv2d": _rewrite(
            path, tmp_path / "d.safetensors", edit_meta=lambda m: m.update(layers=json.dumps(
                {k: {**v, "type": "Conv2d"} for k, v in json.loads(m["layers"]).items()}))),
        "version": _rewrite(path, tmp_path / "e.safetensors",
                            edit_meta=lambda m: m.update(version="9")),
        "not valid JSON": _rewrite(path, tmp_path / "f.safetensors",
                             edit_meta=lambda m: m.update(layers="{" * 5000)),
        "has no FSR": _rewrite(path, tmp_path / "g.safetensors", edit_meta=lambda m: m.update(
            layers=json.dumps({**json.loads(m["layers"]), "features.3": {
                **json.loads(m["layers"])["features.3"], "weights": "logsqrt2-5s"}}))),
    }
    for expected, bad in cases.items():
        with pytest.raises(QuantizedFileError, match=expected):
            load_quantized(_model(), bad)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(QuantizedFileError, match="not a logquant quantized model"):
        load_quantized(_model(), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(QuantizedFileError, match="not a valid safetensors"):
        load_quantized(_model(), tmp_path / "junk.safetensors")
    with pytest.raises(LogquantError, match="takes a model returned by quantize_model"):
        save_quantized(_model(), tmp_path / "x.safetensors")
    with pytest.raises(LogquantError, match="must end in .safetensors"):
        save_quantized(saved[1], tmp_path / "x.pt")
