"""logquant: CNNs in logarithmic data representation (Miyashita, Lee and Murmann, 2016).

The one-call entry points: ``quantize_model`` (post-training) and ``prepare_qat``
(quantization-aware training), both driven by one ``QuantConfig``.
"""

from logquant.config import QuantConfig
from logquant.convert import describe, quantize_model
from logquant.errors import LogquantError
from logquant.formats import LinearFormat, LogFormat, parse_format
from logquant.qat import prepare_qat

__all__ = ["LinearFormat", "LogFormat", "LogquantError", "QuantConfig", "describe",
           "parse_format", "prepare_qat", "quantize_model"]
