"""TSPTQ-ViT: two-scaled post-training quantization for vision transformers.

    from quant import QuantConfig, quantize, save_quantized, load_quantized
    qmodel = quantize(model, calib_images, QuantConfig(method="tsptq", w_bits=8, a_bits=8))
"""

from . import zoo  # noqa: F401  (registers digits_vit with timm)
from .checkpoint import CheckpointError, load_quantized, read_recipe, save_quantized
from .config import KINDS, METHODS, QuantConfig
from .model import Calibrator, QuantizedModel, quantize
from .modules import UnsupportedModelError

__all__ = [
    "KINDS", "METHODS", "Calibrator", "CheckpointError", "QuantConfig", "QuantizedModel",
    "UnsupportedModelError", "load_quantized", "quantize", "read_recipe", "save_quantized",
]
