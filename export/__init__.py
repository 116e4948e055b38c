"""Exporters of the integer program: ``export_onnx(checkpoint, out)`` writes an ONNX model whose
outputs in ONNX Runtime are bit-identical to the integer engine's; ``form="qdq"`` (or
``export_qdq``) writes the fast QDQ graph instead (int8 matmuls fused by ONNX Runtime, float
LayerNorm/Softmax/GELU: close to the engine, not bit-identical)."""

from __future__ import annotations

import os
from pathlib import Path

from .kernels import ExportError
from .onnx_integer import export_onnx as _export_integer
from .onnx_integer import program_to_onnx
from .onnx_qdq import export_qdq, qdq_model
from .qdq_builder import OPERANDS

FORMS = ("integer", "qdq", "auto")


def default_form(checkpoint_path: str | os.PathLike) -> str:
    """``"integer"`` for a checkpoint with an integer program, else ``"qdq"`` (CheckpointError
    for a file that is not a readable checkpoint)."""
    from quant.checkpoint import read_recipe

    return "integer" if read_recipe(checkpoint_path).get("program") is not None else "qdq"


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
                form: str = "integer", operands: str = "u8u8") -> Path:
    """``form="integer"``: the bit-exact integer graph; ``"qdq"``: the fast QDQ graph (its int8
    grids as ``operands``: ``"u8u8"``, exact on every CPU, or ``"s8s8"``, faster where the CPU
    has VNNI); ``"auto"``: the integer graph where the checkpoint has an integer program, else
    the fast one."""
    if form == "auto":
        form = default_form(checkpoint_path)
    if form == "integer":
        return _export_integer(checkpoint_path, out_path)
    if form == "qdq":
        return export_qdq(checkpoint_path, out_path, operands=operands)
    raise ValueError(f"unknown ONNX form {form!r} (one of {FORMS})")


__all__ = ["FORMS", "OPERANDS", "ExportError", "default_form", "export_onnx", "export_qdq",
           "program_to_onnx", "qdq_model"]
