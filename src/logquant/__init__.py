"""logquant: CNNs in logarithmic data representation (Miyashita, Lee and Murmann, 2016).

The one-call entry points: ``quantize_model`` (post-training) and ``prepare_qat``
(quantization-aware training), both driven by one ``QuantConfig``; ``describe`` lists every
conv/linear layer of the result; ``save_quantized`` / ``load_quantized`` keep it.
"""

from logquant.config import QuantConfig
from logquant.convert import describe, quantize_model
from logquant.errors import LogquantError
from logquant.formats import LinearFormat, LogFormat, parse_format
from logquant.persist import load_quantized, save_quantized
from logquant.qat import prepare_qat

__all__ = ["LinearFormat", "LogFormat", "LogquantError", "QuantConfig", "describe",
           "load_quantized", "parse_format", "prepare_qat", "quantize_model", "save_quantized"]
