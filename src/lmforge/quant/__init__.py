"""Weight quantisation (int8, SmoothQuant W8A8, group-wise int4 RTN / AWQ / GPTQ, NF4) and GGUF export.

The quantised layers themselves (storage and matmul) are lmforge.model.quantized, so that
`lmforge.model.load` reads a quantised checkpoint without this package."""
from lmforge.quant.apply import METHODS, quantize_model

__all__ = ["METHODS", "quantize_model"]
