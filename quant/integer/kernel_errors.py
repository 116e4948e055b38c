"""How far each integer kernel (Softmax, GELU, LayerNorm) is from its float function, over the
input range the calibration images (or texts) give it.

The kernels are measured alone, on integer inputs that stand exactly for the real values the
float function is given, so the numbers are the kernels' own arithmetic (polynomials, integer
divisions, the integer square root, output rounding) and no quantizer's rounding:

* Softmax: the program's integer Softmax ops are traced on the calibration inputs for the real
  range of their logits (integer logits times the step the op's ``exp`` multiplier stands for,
  s_l = M / 2^N / (2^16 · log2 e)). Per op, seeded random rows of its row length, uniform over
  that range, go through ``int_softmax`` (its own multiplier) and ``torch.softmax`` of the same
  real logits; the error is in probability (the kernel's output step is 2^-16). Masks are not
  applied (padding keys' logits are finite values and count in the range).
* GELU: the range of fc1's outputs as the GELU kernels see them (requantized to the working grid
  2^-12) over every GELU op; every point of that grid in the range (at most ``grid_points``,
  evenly spaced beyond) through ``int_gelu`` against the exact (erf) ``F.gelu``, so the tanh
  form's own distance from GELU is part of the error.
* LayerNorm: the float twin's LayerNorm inputs on the calibration inputs (a seeded sample of
  rows per LayerNorm, with the rows holding each channel's extremes), put on the grid of the
  LayerNorm's input quantizer (its base scale s) with no clipping; ``int_layernorm`` with the
  lowering's integer ε, γ, β and pre-shift against ``F.layer_norm`` of the same real rows, in
  the LayerNorm's output units.

Rows: {"kernel", "range": [lo, hi] (real input), "max_abs_error", "mean_abs_error", "layers"
(ops or modules measured), "samples" (values compared)}; a kernel the model lacks has no row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import Inputs, call
from ..modules import QLayerNorm, sample_rows
from . import simulate
from .dyadic import requantize
from .gelu import IN_BITS as GELU_BITS
from .gelu import int_gelu
from .lower import LOG2E
from .softmax import PROB_BITS, int_softmax

KERNELS = ("softmax", "gelu", "layernorm")


def _row(kernel: str, lo: float, hi: float, errors: list[Tensor], layers: int) -> dict:
    err = torch.cat([e.flatten() for e in errors])
    return {"kernel": kernel, "range": [float(lo), float(hi)],
            "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
            "layers": layers, "samples": int(err.numel())}


def _trace_kernel_inputs(program, inputs: Inputs) -> dict[int, dict]:
    """Per Softmax / GELU op (by position): the min and max of its integer input as the kernel
    takes it (GELU: requantized to 2^-12), and the length of its rows."""
    index = {id(op): i for i, op in enumerate(program.ops)}
    consumers: dict[str, list] = {}
    for op in program.ops:
        if op.kind in ("softmax", "gelu"):
            consumers.setdefault(op.inputs[0], []).append(op)
    seen: dict[int, dict] = {}

    def trace(op, out: Tensor) -> None:
        for c in consumers.get(op.output, ()):
            v = out if c.kind == "softmax" else requantize(out, c.dyadic("rq"))
            s = seen.setdefault(index[id(c)], {"lo": int(v.min()), "hi": int(v.max()),
                                               "length": int(v.shape[-1])})
            s["lo"], s["hi"] = min(s["lo"], int(v.min())), max(s["hi"], int(v.max()))

    if isinstance(inputs, Mapping):
        program.run(trace=trace, **dict(inputs))
    else:
        program.run(inputs, trace=trace)
    return seen


def _softmax_row(program, seen: dict[int, dict], gen: torch.Generator, rows: int) -> dict | None:
    errors, lo_all, hi_all, layers = [], math.inf, -math.inf, 0
    for i, op in enumerate(program.ops):
        if op.kind != "softmax" or i not in seen:
            continue
        exp = op.dyadic("exp")
        step = float(exp.ratio()) / (2.0 ** 16 * LOG2E)  # the real step of the logits
        lo, hi = seen[i]["lo"] * step, seen[i]["hi"] * step
        real = lo + (hi - lo) * torch.rand(rows, seen[i]["length"], generator=gen,
                                           dtype=torch.float64)
        logits = torch.round(real / step).to(torch.int64)
        p = int_softmax(logits, exp).double() * 2.0 ** -PROB_BITS
        ref = torch.softmax(logits.double() * step, dim=-1)
        errors.append((p - ref).abs())
        lo_all, hi_all, layers = min(lo_all, lo), max(hi_all, hi), layers + 1
    return _row("softmax", lo_all, hi_all, errors, layers) if layers else None


def _gelu_row(program, seen: dict[int, dict], grid_points: int) -> dict | None:
    ops = [i for i, op in enumerate(program.ops) if op.kind == "gelu" and i in seen]
    if not ops:
        return None
    lo, hi = min(seen[i]["lo"] for i in ops), max(seen[i]["hi"] for i in ops)
    if hi - lo + 1 <= grid_points:
        x = torch.arange(lo, hi + 1, dtype=torch.int64)
    else:
        x = torch.linspace(lo, hi, grid_points, dtype=torch.float64).round().to(torch.int64)
    unit = 2.0 ** -GELU_BITS
    err = (int_gelu(x).double() * unit - F.gelu(x.double() * unit)).abs()
    return _row("gelu", lo * unit, hi * unit, [err], len(ops))


def _capture_layernorm_inputs(qmodel, inputs: Inputs, gen: torch.Generator,
                              rows: int) -> list[tuple[QLayerNorm, Tensor]]:
    captured: dict[int, list[Tensor]] = {}
    modules = [m for m in qmodel.model.modules() if isinstance(m, QLayerNorm)]
    hooks = [m.register_forward_pre_hook(
        lambda m, args: captured.setdefault(id(m), []).append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu())) for m in modules]
    try:
        with torch.no_grad():
            call(qmodel.model, inputs)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for m in modules:
        if id(m) not in captured:
            continue
        x = torch.cat(captured[id(m)])
        out.append((m, x[sample_rows(x, rows, gen)]))
    return out


def _input_step(m: QLayerNorm, x: Tensor) -> float:
    """The grid the integer LayerNorm's operand is on: its input quantizer's base scale."""
    scale = getattr(m.input_q, "scale", None)
    if torch.is_tensor(scale) and scale.numel() == 1 and float(scale) > 0:
        return float(scale)
    return max(float(x.abs().max()), 1e-8) / 127  # no scalar scale: an 8-bit-like grid


def _layernorm_error(m: QLayerNorm, x: Tensor) -> Tensor:
    """``int_layernorm`` with the lowering's constants (``lower.Builder.layernorm``) against
    ``F.layer_norm`` of the real rows the integers stand for, in output units."""
    c = m.normalized_shape[0]
    s = _input_step(m, x)
    xq = torch.round(x.double() / s) * s  # the real values the integers stand for
    w = None if m.weight is None else m.weight.detach().double().cpu()
    b = None if m.bias is None else m.bias.detach().double().cpu()
    out = simulate.layernorm(xq, s, m.weight, m.bias, m.eps)
    return (out - F.layer_norm(xq, (c,), w, b, m.eps)).abs()


def _layernorm_row(qmodel, inputs: Inputs, gen: torch.Generator, rows: int) -> dict | None:
    captured = _capture_layernorm_inputs(qmodel, inputs, gen, rows)
    if not captured:
        return None
    errors = [_layernorm_error(m, x) for m, x in captured]
    lo = min(float(x.min()) for _, x in captured)
    hi = max(float(x.max()) for _, x in captured)
    return _row("layernorm", lo, hi, errors, len(captured))


def kernel_errors(qmodel, calib_inputs: Inputs, *, seed: int = 0, rows: int = 128,
                  grid_points: int = 1 << 18, ln_rows: int = 512) -> list[dict]:
    """Per integer kernel of ``qmodel`` (the integer setting: ``qmodel.program`` is set), its
    max and mean absolute error against its float function over the range ``calib_inputs``
    give it (see the module's docstring); deterministic for a given ``seed``. ``rows``: random
    Softmax rows per op; ``grid_points``: GELU grid points at most; ``ln_rows``: LayerNorm rows
    per LayerNorm (plus the rows of each channel's extremes)."""
    program = qmodel.program
    if program is None:
        raise ValueError("kernel_errors measures the integer kernels of the integer setting's "
                         "program: quantize with QuantConfig(setting=\"integer\")")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = _trace_kernel_inputs(program, calib_inputs)
        out = [_softmax_row(program, seen, gen, rows), _gelu_row(program, seen, grid_points),
               _layernorm_row(qmodel, calib_inputs, gen, ln_rows)]
    return [r for r in out if r is not None]
