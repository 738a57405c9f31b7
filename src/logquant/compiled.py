"""torch.compile with a safety net: fused kernels where they work, the same code eagerly
where they do not (``LOGQUANT_COMPILE=0``, no C compiler, tracing inside compile)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch

_cache: dict[Callable, Callable] = {}
_failed = False


def compile_enabled() -> bool:
    return (not _failed and os.environ.get("LOGQUANT_COMPILE", "1") != "0"
            and not torch.compiler.is_compiling())


def fused(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, run as one torch.compile'd (dynamic-shape) kernel when
    enabled. Both paths execute the same tensor code, so results are bit-identical."""
    global _failed
    if not compile_enabled():
        return fn(*args, **kwargs)
    compiled = _cache.get(fn)
    if compiled is None:
        # CPU-only machines: inductor warns once that no CUDA runtime exists; irrelevant here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        compiled = _cache[fn] = torch.compile(fn, dynamic=True)
    try:
        return compiled(*args, **kwargs)
    except Exception as exc:  # no C compiler, unsupported backend, ...: stay correct, go slow
        _failed = True
        warnings.warn(f"logquant: torch.compile unavailable ({exc.__class__.__name__}); "
                      "using the eager kernels", RuntimeWarning, stacklevel=2)
        return fn(*args, **kwargs)
