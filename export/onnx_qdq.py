"""The *fast graph* of a checkpoint: a QDQ ONNX model that ONNX Runtime fuses into 8-bit matmuls,
with float LayerNorm, Softmax and GELU between. Its int8 grids are stored as uint8 (``u8u8``, the
default: exact in ONNX Runtime on every CPU) or as int8 (``s8s8``: exact and faster on CPUs with
VNNI and on ARM, inexact on x86 without VNNI; ``QdqGraph.qdq``).

``export_qdq(checkpoint, out)`` (or ``export_onnx(checkpoint, out, form="qdq")``) builds it from
the checkpoint's content, not by tracing: the calibrated twin
(``quant.load_quantized``) gives each quantizer's real scale, zero point, shift and exponents and
the float weights, and the graph is written module by module, in the twin's order:

* a uniform quantizer of step s and zero point z: ``QuantizeLinear(s, z − 128)`` (int8) then
  ``DequantizeLinear``: its codes shifted by 128, the same values;
* weights: their integer codes as int8 initializers, one scale per output channel
  (``DequantizeLinear`` with ``axis=1`` in front of a ``MatMul``);
* O-2SF / PTF (``pow2``, the LayerNorm input): the fake quantization of scale s·2^e_c and zero
  point z_c in float ops (Div, Round, Max, Min, Mul), or (``per_channel_qdq=True``) a per-channel
  QuantizeLinear/DequantizeLinear pair of scale s·2^e_c and zero point z_c − 128;
* V-2SF (and the twin's sign rule): a fine operand (scale s) and a coarse one (scale 2^m·s) whose
  sum is the fake-quantized value, each its own Q/DQ pair and its own int8 matmul, the two
  products summed; the region split and the clips are Clip passes and QuantizeLinear's own
  saturation (``QdqGraph._v2sf`` derives them), two to five passes;
* token 0's own quantizers (BERT's [CLS], ``first_q``): before a LayerNorm, O-2SF constants
  gathered per row (row 0's, the others'), one pass over the tensor; before a Linear, row 0
  and the other rows quantized and multiplied apart, the products concatenated;
* Softmax's log2 quantizer (FQ-ViT) in float: 2^−round(−log2 a), 0 below 2^−(Q+½).

ONNX Runtime's QDQ transformer turns each DequantizeLinear(act) + DequantizeLinear(weight) ->
MatMul into an int8 kernel (MatMulIntegerToFloat, QLinearMatMul). It is the speed form: its float
LayerNorm, Softmax and GELU differ from the integer engine's kernels by their rounding, so its
logits are close to the engine's (same top-1 on ≥ 99.7 % of the digits test split), not equal.
Families: timm VisionTransformers (ViT, DeiT, distilled DeiT: ``qdq_vit``) and BERT encoders
(``qdq_bert``); the builder and the quantizers' forms: ``qdq_builder``.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .kernels import ExportError


def qdq_model(checkpoint_path: str | os.PathLike, per_channel_qdq: bool = False,
              operands: str = "u8u8") -> onnx.ModelProto:
    """The fast graph of a checkpoint of any setting (the integer one, or the float simulation
    of "full" and "partial": the same quantizers, read from the calibrated twin)."""
    from quant.checkpoint import load_quantized

    from .qdq_builder import OPERANDS

    if operands not in OPERANDS:  # before the checkpoint is read
        raise ValueError(f"unknown operands {operands!r} (one of {OPERANDS})")
    model = load_quantized(checkpoint_path).model  # a tsptq checkpoint, or CheckpointError
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        from .qdq_vit import vit_to_qdq

        return vit_to_qdq(model, per_channel_qdq, operands)
    if type(model).__name__ == "BertModel":
        from .qdq_bert import bert_to_qdq

        return bert_to_qdq(model, per_channel_qdq, operands)
    raise ExportError(f"{type(model).__name__} has no fast (QDQ) ONNX form yet (timm ViT/DeiT and "
                      "BERT encoders have); its integer graph exports: form=\"integer\"")


def export_qdq(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
               per_channel_qdq: bool = False, operands: str = "u8u8") -> Path:
    """Write the fast graph of a checkpoint to ``out_path``."""
    model = qdq_model(checkpoint_path, per_channel_qdq, operands)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out
