"""The integer program of a checkpoint as an ONNX model that ONNX Runtime runs bit-identically.

``export_onnx(checkpoint, out)`` reads the program alone (``quant.checkpoint.read_program``: no
model is built) and translates it operator by operator (``ops.HANDLERS``, one builder per
operator kind, as ``RUNNERS`` has one runner per kind). The graph's inputs are the program's:
float32 ``images`` (N, C, H, W) for a vision model, int64 ``input_ids``, ``attention_mask`` and
``token_type_ids`` (N, L) for BERT, the batch (and the sequence length) dynamic; its output is
the program's (float32 logits, or BERT's last hidden state). Between the image quantizer and the
final dequantization every tensor is an integer: int64, uint8 into ``MatMulInteger``, bool.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

from quant.integer.program import Program

from .graph import F32, I64, Graph, finish_model
from .kernels import ExportError
from .ops import HANDLERS, Value

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inputs(program: Program) -> list:
    out = []
    for name in program.inputs:
        if name in TEXT_INPUTS:
            out.append(helper.make_tensor_value_info(name, I64, ["N", "L"]))
        elif name == "images":
            conv = next((op for op in program.ops if op.kind == "patch_conv"), None)
            channels = "C"
            if conv is not None:
                ph, pw = conv.attrs["patch"]
                channels = conv.tensors["weight"].shape[1] // (ph * pw)
            out.append(helper.make_tensor_value_info(name, F32, ["N", channels, "H", "W"]))
        else:
            raise ExportError(f"unknown program input {name!r}")
    return out


def program_to_onnx(program: Program) -> onnx.ModelProto:
    """The ONNX model of an integer program (checked with ``full_check``)."""
    unknown = sorted({op.kind for op in program.ops} - set(HANDLERS))
    if unknown:
        raise ExportError(f"operator kind(s) {unknown} cannot be exported to ONNX")
    g = Graph()
    inputs = _inputs(program)
    env: dict[str, Value | None] = {
        i.name: Value(i.name, len(i.type.tensor_type.shape.dim)) for i in inputs}
    for op in program.ops:
        g.scope = f"{op.kind}_{op.output}"
        env[op.output] = HANDLERS[op.kind](g, op, *(env.get(i) for i in op.inputs))
    outputs = []
    for name in program.outputs:
        v = env[name]
        g.nodes.append(helper.make_node("Identity", [v.name], [name], name=f"output_{name}"))
        text = any(i in TEXT_INPUTS for i in program.inputs)
        dims = (["N", "L"] if text else ["N"])[: v.rank]
        dims += [None] * (v.rank - len(dims))
        outputs.append(helper.make_tensor_value_info(name, F32, dims))
    graph = helper.make_graph(g.nodes, "tsptq_integer_program", inputs, outputs,
                              initializer=g.initializers)
    return finish_model(graph, __doc__.splitlines()[0])


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the ONNX model of the checkpoint's integer program to ``out_path``; raises
    ``quant.checkpoint.CheckpointError`` for a file without an integer program (a checkpoint of
    the "full" or "partial" setting) and ``ExportError`` for an operator with no ONNX form."""
    from quant.checkpoint import read_program

    model = program_to_onnx(read_program(checkpoint_path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out
