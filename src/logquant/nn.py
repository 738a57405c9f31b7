"""Quantized modules: one ``Quantizer`` (weights, activations) and conv/linear that use it.

The quantizer simulates a format in float (fake quantization) and passes gradients straight
through (optionally clipped where the input saturated), so the same module serves
post-training quantization and quantization-aware training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logquant.distributed import global_max
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


FSR_RULES = ("fixed", "current_max", "running_max")


class Quantizer(nn.Module):
    """Applies one format; its FSR (and sign) live in buffers, so they travel with state_dict.

    ``spec`` is the format without its FSR (bits, sign, base, rounding); the ``fsr`` buffer sets
    it. A quantizer whose spec is None is the identity. In training mode the FSR follows
    a rule: ``fixed`` (calibrated once), ``current_max`` (each step, the smallest FSR with
    max|x| < 2^FSR; used for weights) or ``running_max`` (the same on an exponential moving
    average of the per-step max|x|, ``momentum`` 0.9; used for activations). An unsigned spec
    that meets negative values in training becomes signed with the same total bits.
    """

    def __init__(self, spec: Format | None, fsr: int | None = None, clip_ste: bool = False,
                 rule: str = "fixed", momentum: float = 0.9):
        super().__init__()
        if rule not in FSR_RULES:
            raise ValueError(f"rule must be one of {FSR_RULES}, got {rule!r}")
        self.spec = None if spec is None else spec.with_fsr(None)
        self.clip_ste, self.rule, self.momentum = clip_ste, rule, momentum
        fsr = spec.fsr if fsr is None and spec is not None else fsr
        self.register_buffer("fsr", torch.tensor(0 if fsr is None else fsr, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(fsr is not None))
        self.register_buffer("signed", torch.tensor(bool(spec is not None and spec.signed)))
        self.register_buffer("running_max", torch.tensor(0.0))
        self._formats: dict[tuple[int, bool], Format] = {}
        self._scratch: torch.Tensor | None = None  # reused inference output, see forward

    def set_fsr(self, fsr: int) -> None:
        self.fsr.fill_(int(fsr))
        self.calibrated.fill_(True)

    @property
    def format(self) -> Format | None:
        """The complete format (with FSR and sign), or None when disabled or uncalibrated."""
        if self.spec is None or not bool(self.calibrated):
            return None
        key = (int(self.fsr), bool(self.signed))
        fmt = self._formats.get(key)
        if fmt is None:
            fmt = self._formats[key] = self.spec.with_signed(key[1]).with_fsr(key[0])
        return fmt

    @torch.no_grad()
    def start_from(self, max_abs: float, has_negative: bool) -> None:
        """Initialize the running statistics from calibration data."""
        from logquant.calibrate import fsr_covering

        self.running_max.fill_(max_abs)
        if has_negative and self.spec.bits >= 2:
            self.signed.fill_(True)
        self.set_fsr(fsr_covering(max_abs))

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        """Training-time FSR (and sign) update by ``rule``."""
        from logquant.calibrate import fsr_covering

        if not bool(self.signed) and self.spec.bits >= 2 and bool(global_max(
                (x.detach().amin() < 0).float().reshape(1))):
            self.signed.fill_(True)
        batch_max = global_max(x.detach().abs().amax().float().reshape(1))[0]
        if self.rule == "running_max" and bool(self.calibrated):
            self.running_max.mul_(self.momentum).add_(batch_max * (1 - self.momentum))
        else:
            self.running_max.copy_(batch_max)
        self.set_fsr(fsr_covering(float(self.running_max)))

    def forward(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Quantize ``x``. ``scratch=True`` lets inference write into a buffer this module
        reuses across calls: only for callers that consume the result before the next call
        (conv/linear inputs do) and never while autograd records."""
        if self.spec is None:
            return x
        if self.training and self.rule != "fixed":
            self._track(x)
        fmt = self.format
        if fmt is None:
            raise RuntimeError(f"quantizer {self.spec.name} has no FSR yet: calibrate it "
                               "(quantize_model / prepare_qat do) or call set_fsr()")
        if scratch and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            buffer = self._scratch
            if (buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype
                    or buffer.device != x.device):
                buffer = self._scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
            return fmt.quantize(x, out=buffer)
        return fake_quantize(x, fmt, self.clip_ste)

    def extra_repr(self) -> str:
        if self.spec is None:
            return "float"
        fmt = self.format
        return f"{(fmt or self.spec).name}, rule={self.rule}"


class _QuantizeError(torch.autograd.Function):
    """Identity forward; the back-propagated error is quantized on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: ErrorQuantizer) -> torch.Tensor:
        ctx.quantizer = quantizer
        return x.clone()  # not a view: the ReLU that usually follows works in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.quantizer.quantize_error(grad), None


class ErrorQuantizer(nn.Module):
    """Quantizes the gradient w.r.t. a layer's output (the paper's back-propagated errors).

    Rule, per layer and per step: FSR = the smallest integer with max|error| < 2^FSR, the
    maximum taken over the whole (global, if distributed) batch. Errors are signed, so an
    unsigned spec becomes signed with the same total bits.
    """

    def __init__(self, spec: Format | None):
        super().__init__()
        if spec is not None and not spec.signed:
            spec = spec.with_signed(True)
        self.spec = None if spec is None else spec.with_fsr(None)
        self.register_buffer("last_fsr", torch.tensor(0, dtype=torch.int64))

    def quantize_error(self, grad: torch.Tensor) -> torch.Tensor:
        from logquant.calibrate import fsr_covering

        peak = float(global_max(grad.detach().abs().amax().float().reshape(1))[0])
        if not peak > 0 or not torch.isfinite(torch.tensor(peak)):
            return grad  # all-zero errors stay zero; non-finite ones surface as a NaN loss
        fsr = fsr_covering(peak)
        self.last_fsr.fill_(fsr)
        return self.spec.with_fsr(fsr).quantize(grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _QuantizeError.apply(x, self)

    def extra_repr(self) -> str:
        return "float" if self.spec is None else self.spec.name


class _QuantizedLayer:
    """Mixin for conv/linear: quantize the input, then the weight (unless already frozen)."""

    input_quant: Quantizer
    weight_quant: Quantizer

    def _init_quantizers(self, weight_format: Format | None, act_format: Format | None):
        self.weight_quant = Quantizer(weight_format)
        self.input_quant = Quantizer(act_format)
        self.error_quant = ErrorQuantizer(None)
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
        return self.error_quant(self._conv_forward(xq, self.quantized_weight(), self.bias))

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
        out = F.linear(self.input_quant(x, scratch=True), self.quantized_weight(), self.bias)
        return self.error_quant(out)

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
