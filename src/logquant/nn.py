"""Quantized layers: one ``Quantizer`` (weights, activations) attached to any conv/linear.

A quantizer simulates a format in float (fake quantization) and passes gradients straight
through (optionally clipped where the input saturated), so the same module serves
post-training quantization and quantization-aware training.

A layer is quantized in place, whatever its class: its class becomes a subclass of itself
that runs the layer's own ``forward`` while intercepting the one conv/linear call inside it
(a ``TorchFunctionMode``, thread-local). That call's input and weight are quantized, so the
layer keeps its padding, groups, dilation and any weight transform (weight standardization,
``torch.nn.utils.parametrize``, "same" padding of TF ports): the weight quantized is the
weight the layer actually uses, the input the one it actually receives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from logquant.distributed import global_max
from logquant.errors import LogquantError
from logquant.formats import Format, is_exporting


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


_SCRATCH = threading.local()  # per thread: {(device, dtype, inference mode): flat buffer}
_SCRATCH_MIN_NUMEL = 1 << 16  # below this a fresh tensor costs nothing worth saving


def _thread_scratch(x: torch.Tensor) -> torch.Tensor | None:
    """A contiguous buffer shaped like ``x`` that this thread reuses for every layer's
    quantized input (None where reuse is unsafe or pointless: autograd recording, tracing,
    small tensors). Reusing warm memory saves the page faults of a fresh large tensor per
    layer per call (measured: 10 to 20% of a PTQ forward on the reference model)."""
    # tracing first: comparing a traced (symbolic) size with a constant would make the
    # exporter specialize on the batch size
    if torch.compiler.is_compiling() or is_exporting() or torch.is_grad_enabled():
        return None
    if x.numel() < _SCRATCH_MIN_NUMEL:
        return None
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    key = (x.device, x.dtype, torch.is_inference_mode_enabled())
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < x.numel():
        buffer = pool[key] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    return buffer[:x.numel()].view(x.shape)


# Training-time FSR rules: how the magnitude that the "max" policy covers is tracked over
# steps, from (tracked so far, this batch's max|x|, momentum, already calibrated).
FsrRule = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
FSR_RULES: dict[str, FsrRule | None] = {
    "fixed": None,  # calibrated once (post-training, or a format with a fixed FSR)
    "current_max": lambda tracked, batch, momentum, calibrated: batch,
    "running_max": lambda tracked, batch, momentum, calibrated:
        tracked * momentum + batch * (1 - momentum) if calibrated else batch,
}


class Quantizer(nn.Module):
    """Applies one format; its FSR (and sign) live in buffers, so they travel with state_dict.

    ``spec`` is the format without its FSR (bits, sign, base, rounding); the ``fsr`` buffer sets
    it. A quantizer whose spec is None is the identity. In training mode the FSR follows
    a rule: ``fixed`` (calibrated once), ``current_max`` (each step, the smallest FSR with
    max|x| < 2^FSR; used for weights) or ``running_max`` (the same on an exponential moving
    average of the per-step max|x|, ``momentum`` 0.9; used for activations). An unsigned spec
    that meets negative values in training becomes signed with the same total bits.

    The complete format is also kept as a Python object (``format``), refreshed whenever
    the buffers change, so that inference never reads a tensor to decide what to do: no
    host synchronization per layer, and torch.compile / torch.export see a static graph.
    """

    def __init__(self, spec: Format | None, fsr: int | None = None, clip_ste: bool = False,
                 rule: str = "fixed", momentum: float = 0.9):
        super().__init__()
        if rule not in FSR_RULES:
            raise ValueError(f"rule must be one of {', '.join(FSR_RULES)}, got {rule!r}")
        self.spec = None if spec is None else spec.with_fsr(None)
        self.clip_ste, self.rule, self.momentum = clip_ste, rule, momentum
        fsr = spec.fsr if fsr is None and spec is not None else fsr
        self.register_buffer("fsr", torch.tensor(0 if fsr is None else fsr, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(fsr is not None))
        self.register_buffer("signed", torch.tensor(bool(spec is not None and spec.signed)))
        self.register_buffer("running_max", torch.tensor(0.0))
        self.format: Format | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Derive ``format`` from the buffers (after construction, set_fsr, loading)."""
        if self.spec is None or not bool(self.calibrated):
            self.format = None
        else:
            self.format = self.spec.with_signed(bool(self.signed)).with_fsr(int(self.fsr))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def set_fsr(self, fsr: int) -> None:
        self.fsr.fill_(int(fsr))
        self.calibrated.fill_(True)
        self._refresh()

    @torch.no_grad()
    def start_from(self, max_abs: float, has_negative: bool) -> None:
        """Initialize the running statistics from calibration data."""
        self.running_max.fill_(max_abs)
        if has_negative and self.spec.bits >= 2:
            self.signed.fill_(True)
        self._cover_running_max()

    def _cover_running_max(self) -> None:
        from logquant.calibrate import choose_fsr, stats_of

        self.set_fsr(choose_fsr(stats_of(self.running_max), self.spec, "max"))

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        """Training-time FSR (and sign) update by ``rule``."""
        if not bool(self.signed) and self.spec.bits >= 2 and bool(global_max(
                (x.detach().amin() < 0).float().reshape(1))):
            self.signed.fill_(True)
        batch_max = global_max(x.detach().abs().amax().float().reshape(1))[0]
        update = FSR_RULES[self.rule]
        self.running_max.copy_(update(self.running_max, batch_max, self.momentum,
                                      bool(self.calibrated)))
        self._cover_running_max()

    def forward(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Quantize ``x``. ``scratch=True`` (conv/linear inputs, consumed at once) lets
        inference write into this thread's reusable buffer; otherwise the result is a new
        tensor. Nothing is shared between threads."""
        if self.spec is None:
            return x
        if self.training and self.rule != "fixed":
            self._track(x)
        fmt = self.format
        if fmt is None:
            raise RuntimeError(f"quantizer {self.spec.name} has no FSR yet: calibrate it "
                               "(quantize_model / prepare_qat do) or call set_fsr()")
        buffer = _thread_scratch(x) if scratch else None
        if buffer is not None:
            return fmt.quantize(x, out=buffer)
        return fake_quantize(x, fmt, self.clip_ste)

    def extra_repr(self) -> str:
        if self.spec is None:
            return "float"
        return f"{(self.format or self.spec).name}, rule={self.rule}"


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


# ----------------------------------------------------------------------------------------
# Which layers are quantized, and the one call inside each that is intercepted

# Float layer type -> kind ("conv" / "fc": which weight format of QuantConfig applies).
# Subclasses count: a layer is quantizable when it is an instance of one of these.
LAYER_KINDS: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv", nn.ConvTranspose2d: "conv", nn.ConvTranspose3d: "conv",
    nn.Linear: "fc",
}

# The functional ops those layers compute with; (input, weight) are their first arguments.
LAYER_FUNCTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                             F.conv_transpose2d, F.conv_transpose3d, F.linear})


def layer_kind(module: nn.Module) -> str | None:
    """"conv" or "fc" for a module logquant quantizes (subclasses included), else None."""
    for cls in type(module).__mro__:
        kind = LAYER_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


class UnsupportedLayerError(LogquantError):
    """A conv/linear layer whose forward logquant cannot quantize faithfully."""


class _LayerCall(TorchFunctionMode):
    """Active while one quantized layer runs its own forward: quantizes the input and
    weight of the conv/linear call made there, and counts such calls (exactly one is
    allowed). Torch function modes are thread-local, so concurrent calls never mix."""

    def __init__(self, layer: QuantizedLayer):
        super().__init__()
        self.layer = layer
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in LAYER_FUNCTIONS:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise UnsupportedLayerError(
                f"{self.layer.logquant_name}: its forward computes more than one conv/linear "
                "op; quantize its parts as separate layers, or leave it float "
                "(unsupported='float')")
        x, weight, rest = _split_args(func, args, kwargs)
        layer = self.layer
        observer = layer.logquant_observer
        if observer is not None:
            observer(x, weight)
        # the quantized input is consumed by this call alone, so it may live in scratch
        out = func(layer.input_quant(x, scratch=True), layer._use_weight(weight), *rest,
                   **kwargs)
        return layer.error_quant(out)


def _split_args(func, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(input, weight, remaining positional args) of a conv/linear call."""
    if len(args) >= 2:
        return args[0], args[1], tuple(args[2:])
    x = args[0] if args else kwargs.pop("input")
    return x, kwargs.pop("weight"), ()


class QuantizedLayer:
    """Mixin placed before a conv/linear class: the quantized version of that class.

    Attributes: ``input_quant`` and ``weight_quant`` (Quantizer), ``error_quant``
    (ErrorQuantizer, training only), ``uses_stored_weight`` (the call receives the weight
    parameter itself), ``weight_frozen`` (that parameter already holds quantized values:
    post-training), ``logquant_name`` (for messages) and
    ``logquant_observer`` (calibration: called with the call's float input and weight).
    """

    input_quant: Quantizer
    weight_quant: Quantizer
    error_quant: ErrorQuantizer
    weight_frozen: bool
    uses_stored_weight: bool
    logquant_name: str
    logquant_observer: Callable[[torch.Tensor, torch.Tensor], None] | None

    def _init_quantizers(self, name: str = "") -> None:
        self.weight_quant = Quantizer(None)
        self.input_quant = Quantizer(None)
        self.error_quant = ErrorQuantizer(None)
        self.weight_frozen = False
        # whether the conv/linear call receives the weight parameter itself: known for the
        # torch classes' own forwards; otherwise a probe (convert.attach_quantizers) tells
        self.uses_stored_weight = ("weight" in self._parameters and any(
            float_class(self).forward is cls.forward for cls in LAYER_KINDS))
        self.logquant_name = name or type(self).__name__
        self.logquant_observer = None

    def forward(self, *args, **kwargs):
        mode = _LayerCall(self)
        with mode:
            out = super().forward(*args, **kwargs)
        if mode.calls == 0:
            raise UnsupportedLayerError(
                f"{self.logquant_name}: its forward computes no conv/linear op that logquant "
                "can intercept (F.conv*/F.linear); leave it float (unsupported='float')")
        return out

    @property
    def stored_weight(self) -> torch.Tensor | None:
        """The weight parameter itself when the layer's call computes with it as stored
        (not parametrized, not transformed in forward: ``uses_stored_weight``), else None."""
        return self._parameters.get("weight") if self.uses_stored_weight else None

    def _use_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.weight_frozen and weight is self.stored_weight:
            return weight  # already quantized in place
        return self.weight_quant(weight)

    def freeze_weight(self) -> None:
        """Replace the stored float weight by its quantized value once (post-training)."""
        weight = self.stored_weight
        if weight is None:
            raise UnsupportedLayerError(f"{self.logquant_name}: its weight is computed "
                                        "(parametrized or transformed in forward); it is "
                                        "quantized at each call")
        with torch.no_grad():
            weight.copy_(self.weight_quant(weight))
        self.weight_frozen = True

    def quantized_weight(self) -> torch.Tensor:
        """The quantized weight this layer computes with (stored weights only)."""
        weight = self.stored_weight
        if weight is None:
            raise UnsupportedLayerError(f"{self.logquant_name}: its weight is computed "
                                        "(parametrized or transformed in forward), not stored")
        return weight if self.weight_frozen else self.weight_quant(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # files written before weight_frozen became a plain attribute carry it as a buffer
        frozen = state_dict.pop(prefix + "weight_frozen", None)
        if frozen is not None:
            self.weight_frozen = bool(frozen)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_QUANTIZED_CLASSES: dict[type, type] = {}
_CLASS_LOCK = threading.Lock()


def quantized_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The quantized version of a conv/linear class (made once per class)."""
    with _CLASS_LOCK:
        qcls = _QUANTIZED_CLASSES.get(cls)
        if qcls is None:
            qcls = type(f"Q{cls.__name__}", (QuantizedLayer, cls),
                        {"__module__": __name__, "__qualname__": f"Q{cls.__name__}",
                         "__doc__": f"{cls.__name__} with quantized input and weight."})
            _QUANTIZED_CLASSES[cls] = qcls
        return qcls


def quantize_layer_(module: nn.Module, name: str = "") -> QuantizedLayer:
    """Make ``module`` (a conv/linear, any subclass) quantized in place, with identity
    quantizers to be configured; returns it."""
    if isinstance(module, QuantizedLayer):
        raise LogquantError(f"{name or type(module).__name__} is already quantized")
    if layer_kind(module) is None:
        raise LogquantError(f"{name}: {type(module).__name__} is not a conv/linear layer")
    module.__class__ = quantized_class(type(module))
    module._init_quantizers(name)
    return module


def restore_float_(module: nn.Module) -> nn.Module:
    """Undo ``quantize_layer_``: the layer's own class again, without quantizers."""
    if isinstance(module, QuantizedLayer):
        for attr in ("weight_quant", "input_quant", "error_quant"):
            delattr(module, attr)
        for attr in ("weight_frozen", "uses_stored_weight", "logquant_name",
                     "logquant_observer"):
            module.__dict__.pop(attr, None)
        module.__class__ = float_class(module)
    return module


def float_class(module: nn.Module) -> type[nn.Module]:
    """The class a (possibly quantized) layer had before quantization."""
    return type(module).__mro__[2] if isinstance(module, QuantizedLayer) else type(module)


QConv2d = quantized_class(nn.Conv2d)
QLinear = quantized_class(nn.Linear)
