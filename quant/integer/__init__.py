"""The integer setting: the quantized model as the integer program a device runs.

``lower`` (per family: ``lower_vit``) turns a calibrated twin into a ``Program`` of integer
operators (``program``) built from the integer kernels: dyadic requantization (``dyadic``), the
quantizers' integer encoders (``encoders``), int32-accumulating matmuls with proved worst cases
(``matmul``), Softmax, GELU and LayerNorm (``softmax``, ``gelu``, ``layernorm``, on ``exp2``).
``engine`` runs a saved checkpoint's program with integer tensors only.
"""

from .engine import IntegerEngine, load_program
from .lower import AccumulatorOverflowError
from .program import FloatLeak, Program

__all__ = ["AccumulatorOverflowError", "FloatLeak", "IntegerEngine", "Program", "load_program"]
