"""Exporters of the integer program: ``export_onnx(checkpoint, out)`` writes an ONNX model whose
outputs in ONNX Runtime are bit-identical to the integer engine's."""

from .kernels import ExportError
from .onnx_integer import export_onnx, program_to_onnx

__all__ = ["ExportError", "export_onnx", "program_to_onnx"]
