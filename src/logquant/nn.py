"""Quantized modules: one ``Quantizer`` (weights, activations) and conv/linear that use it.

The quantizer simulates a format in float (fake quantization) and passes gradients straight
through (optionally clipped where the input saturated), so the same module serves
post-training quantization and quantization-aware training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logquant.formats import Format


class _QuantizeSTE(torch.autograd.Function):
    """y = fmt.quantize(x); dy/dx = 1 (or 0 where |x| saturated, when ``clip``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, clip: bool) -> torch.Tensor:
        if clip:
            ctx.save_for_backward(x.abs() <= fmt.max_value)
        ctx.clip = clip
        return fmt.quantize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.clip:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None


def fake_quantize(x: torch.Tensor, fmt: Format | None, clip: bool = False) -> torch.Tensor:
    """Quantize ``x`` to ``fmt`` in float, differentiably (straight-through estimator)."""
    if fmt is None:
        return x
    if x.requires_grad:
        return _QuantizeSTE.apply(x, fmt, clip)
    return fmt.quantize(x)


class Quantizer(nn.Module):
    """Applies one format; its FSR lives in a buffer so it travels with the state_dict.

    ``spec`` is the format family (bits, sign, base, rounding); ``fsr`` picks the member.
    A quantizer whose spec is None is the identity.
    """

    def __init__(self, spec: Format | None, fsr: int | None = None, clip_ste: bool = False):
        super().__init__()
        self.spec = None if spec is None else spec.with_fsr(None)
        self.clip_ste = clip_ste
        fsr = spec.fsr if fsr is None and spec is not None else fsr
        self.register_buffer("fsr", torch.tensor(0 if fsr is None else fsr, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(fsr is not None))
        self._scratch: torch.Tensor | None = None  # reused inference output, see forward
        self._refresh()

    def _refresh(self) -> None:
        ready = self.spec is not None and bool(self.calibrated)
        self._format = self.spec.with_fsr(int(self.fsr)) if ready else None

    def set_fsr(self, fsr: int) -> None:
        self.fsr.fill_(int(fsr))
        self.calibrated.fill_(True)
        self._refresh()

    @property
    def format(self) -> Format | None:
        """The complete format (with FSR), or None when disabled."""
        return self._format

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def forward(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Quantize ``x``. ``scratch=True`` lets inference write into a buffer this module
        reuses across calls: only for callers that consume the result before the next call
        (conv/linear inputs do) and never while autograd records."""
        if self.spec is None:
            return x
        if self._format is None:
            raise RuntimeError(f"quantizer {self.spec.name} has no FSR yet: calibrate it "
                               "(quantize_model / prepare_qat do) or call set_fsr()")
        if scratch and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            buffer = self._scratch
            if (buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype
                    or buffer.device != x.device):
                buffer = self._scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
            return self._format.quantize(x, out=buffer)
        return fake_quantize(x, self._format, self.clip_ste)

    def extra_repr(self) -> str:
        return "float" if self.spec is None else (self._format or self.spec).name


class _QuantizedLayer:
    """Mixin for conv/linear: quantize the input, then the weight (unless already frozen)."""

    input_quant: Quantizer
    weight_quant: Quantizer

    def _init_quantizers(self, weight_format: Format | None, act_format: Format | None):
        self.weight_quant = Quantizer(weight_format)
        self.input_quant = Quantizer(act_format)
        self.register_buffer("weight_frozen", torch.tensor(False))

    def freeze_weight(self) -> None:
        """Replace the float weight by its quantized value once (post-training use)."""
        with torch.no_grad():
            self.weight.copy_(self.weight_quant(self.weight))
        self.weight_frozen.fill_(True)

    def quantized_weight(self) -> torch.Tensor:
        if bool(self.weight_frozen):
            return self.weight
        return self.weight_quant(self.weight)

    @classmethod
    def from_float(cls, module: nn.Module, weight_format: Format | None = None,
                   act_format: Format | None = None):
        """A quantized copy of ``module`` sharing nothing with it."""
        raise NotImplementedError


class QConv2d(_QuantizedLayer, nn.Conv2d):
    """nn.Conv2d whose input and weight pass through quantizers before ``F.conv2d``."""

    def __init__(self, *args, weight_format: Format | None = None,
                 act_format: Format | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_format, act_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quant(x, scratch=True)  # consumed right here: a reusable buffer
        return self._conv_forward(xq, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_format=None, act_format=None) -> QConv2d:
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=module.bias is not None,
                  padding_mode=module.padding_mode, weight_format=weight_format,
                  act_format=act_format, device=module.weight.device,
                  dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        return new


class QLinear(_QuantizedLayer, nn.Linear):
    """nn.Linear whose input and weight pass through quantizers before ``F.linear``."""

    def __init__(self, *args, weight_format: Format | None = None,
                 act_format: Format | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_format, act_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x, scratch=True), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Linear, weight_format=None, act_format=None) -> QLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  weight_format=weight_format, act_format=act_format,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        return new


# The data-driven map from float module types to their quantized versions, and the kind
# ("conv" / "fc") that selects the weight format in QuantConfig.
QUANTIZED_TYPES: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.Conv2d: (QConv2d, "conv"),
    nn.Linear: (QLinear, "fc"),
}
