"""The search space: what a candidate may change in a quantized model, and what it costs.

A ``Candidate`` is a set of per-quantizer overrides (bit widths, pinned search parameters) on top
of a base ``QuantConfig``; it is JSON-serialisable and has a stable key, so a worker, a database
row and a report can all name the same candidate. ``SearchSpace.from_model`` measures, once, what
each quantizer handles per image, which is what the budgets (mean bits, weight bytes, BitOPs)
are computed from. BitOPs count a V-2SF operand's matmul twice (``SearchSpace.bitops``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import product

import torch
from torch import nn

from quant import QuantConfig, QuantizedModel
from quant.calibrate import integer_parameters
from quant.factory import QuantizerFactory
from quant.inputs import Inputs, call, take, to_device
from quant.modules import QAttention, QWeighted
from quant.quantizers import ChannelPow2Quantizer, Quantizer, TwoScaleValueQuantizer

Params = tuple[tuple[str, float], ...]


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in d.items()))


@dataclass(frozen=True)
class Candidate:
    """Per-quantizer overrides, keyed by quantizer name (sorted tuples: hashable, canonical)."""

    bits: tuple[tuple[str, int], ...] = ()
    pinned: tuple[tuple[str, Params], ...] = ()

    @classmethod
    def make(cls, bits: dict[str, int] | None = None,
             pinned: dict[str, dict] | None = None) -> Candidate:
        return cls(_freeze(bits or {}), _freeze(pinned or {}))

    def to_dict(self) -> dict:
        return {"bits": dict(self.bits), "pinned": {n: dict(p) for n, p in self.pinned}}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        unknown = set(d) - {"bits", "pinned"}
        if unknown:
            raise ValueError(f"unknown candidate fields {sorted(unknown)}")
        return cls.make(d.get("bits"), d.get("pinned"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @cached_property
    def key(self) -> str:
        """Stable across processes and machines (unlike ``hash``). Kept once computed: a
        search's driver asks for keys tens of thousands of times (0.6 s of its CPU in a digits
        greedy search, on a machine whose cores the workers use)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @cached_property
    def _module_overrides(self) -> frozenset[tuple[str, tuple]]:
        by_module: dict[str, list] = {}
        for kind, items in (("bits", self.bits), ("pinned", self.pinned)):
            for name, value in items:
                by_module.setdefault(name.rpartition(".")[0], []).append((kind, name, value))
        return frozenset((m, tuple(v)) for m, v in by_module.items())

    def module_overrides(self) -> frozenset[tuple[str, tuple]]:
        """(module, its quantizers' overrides) for each module this candidate changes (a
        quantizer's module: its name less the last part): two candidates that share an entry
        need that module calibrated alike. Computed once (a pool asks for it at every task)."""
        return self._module_overrides

    def config(self, base: QuantConfig) -> QuantConfig:
        return replace(base, bit_overrides=dict(self.bits),
                       pinned={n: dict(p) for n, p in self.pinned})


# The grid a search tries for each pinnable parameter. V-2SF: the scale ratio m (with the range it
# sets the split threshold τ) and the fine region's share of the codes; O-2SF: the outlier
# threshold T (× the median channel range) and the outlier exponent k.
PARAM_GRID: dict[str, tuple] = {"shift": (1, 2, 3, 4, 5, 6), "fine_share": (0.25, 0.5, 0.75),
                                "threshold": (2.0, 4.0, 8.0, 16.0), "exponent": (1, 2, 3, 4)}


def searchable_params(q: Quantizer) -> tuple[str, ...]:
    if isinstance(q, TwoScaleValueQuantizer) or (isinstance(q, ChannelPow2Quantizer)
                                                and q.rule == "o2sf"):
        return tuple(sorted(q.restrictable))
    return ()


def chosen_parameters(q: Quantizer) -> dict:
    """The searchable parameters a calibrated quantizer ended up with."""
    if isinstance(q, TwoScaleValueQuantizer):
        return {"shift": int(q.shift), "fine_share": int(q.fine_codes) / q.levels}
    if isinstance(q, ChannelPow2Quantizer) and q.rule == "o2sf":
        out = {"exponent": int(q.exponent.max())}
        if q.chosen_threshold is not None:
            out["threshold"] = q.chosen_threshold
        return out
    return {}


@dataclass(frozen=True)
class QuantizerSlot:
    """One quantizer of the model, as the search sees it."""

    name: str
    kind: str
    scheme: str
    bits: int       # under the base config
    elements: int   # values it quantizes per image (weights: the tensor, once)
    params: tuple[str, ...] = ()  # the parameters a candidate may pin (V-2SF and O-2SF only)

    def options(self) -> list[dict]:
        """Every combination of this quantizer's pinnable parameters on the search grid."""
        grids = [PARAM_GRID[p] for p in self.params]
        return [dict(zip(self.params, combo, strict=True)) for combo in product(*grids)]


@dataclass
class SearchSpace:
    base: QuantConfig
    slots: dict[str, QuantizerSlot]
    # Multiply-accumulates per image of each matmul: (its two operand quantizers, MACs).
    macs: list[tuple[str, str, int]] = field(default_factory=list)

    @classmethod
    def from_model(cls, qmodel: QuantizedModel, image: Inputs) -> SearchSpace:
        """Measure, with one forward pass on the first sample of ``image`` (an image batch, or a
        text batch whose first text sets the sequence length), what each enabled
        quantizer handles per image and the MACs of every weighted layer and attention matmul."""
        model = qmodel.model
        names = {id(q): n for n, q in qmodel.quantizers()}
        seen: dict[str, int] = {}
        macs: list[tuple[str, str, int]] = []
        hooks = []

        def count(q: Quantizer):
            def hook(_m, args):
                seen[names[id(q)]] = max(seen.get(names[id(q)], 0), args[0].numel())
            return hook

        def weighted(m: QWeighted):
            def hook(_m, _args, out):
                per_out = m.weight[0].numel()  # in_features, or Cin·kh·kw
                total, w = out.numel() * per_out, names[id(m.weight_q)]
                if m.first_q is not None and out.dim() == 3 and out.shape[1] > 1:
                    first = total // out.shape[1]  # token 0 under its own quantizer
                    macs.append((w, names[id(m.first_q)], first))
                    total -= first
                macs.append((w, names[id(m.input_q)], total))
            return hook

        def attention(m: QAttention):
            def hook(_m, args):
                b, n, c = args[0].shape
                macs.append((names[id(m.q_q)], names[id(m.k_q)], b * n * n * c))
                macs.append((names[id(m.a_q)], names[id(m.v_q)], b * n * n * c))
            return hook

        for _, q in qmodel.quantizers():
            hooks.append(q.register_forward_pre_hook(count(q)))
        for m in model.modules():
            if isinstance(m, QWeighted):
                hooks.append(m.register_forward_hook(weighted(m)))
            elif isinstance(m, QAttention):
                hooks.append(m.register_forward_pre_hook(attention(m)))
        try:
            with torch.no_grad():
                call(model, to_device(take(image, 0, 1), next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        slots = {}
        for name, q in qmodel.quantizers():
            if not q.enabled:
                continue
            elements = seen.get(name)
            if elements is None:  # parameters quantized in place: count the parameter itself
                elements = _param_elements(model, name)
            slots[name] = QuantizerSlot(name, q.kind, q.scheme, q.bits, elements,
                                        searchable_params(q))
        return cls(qmodel.config, slots, macs)

    def bits_of(self, candidate: Candidate) -> dict[str, int]:
        over = dict(candidate.bits)
        return {n: over.get(n, s.bits) for n, s in self.slots.items()}

    def mean_bits(self, candidate: Candidate, weights: bool) -> float:
        """Mean bit width of weights (or of activations), weighted by the elements each
        quantizer handles per image."""
        bits = self.bits_of(candidate)
        chosen = [s for s in self.slots.values()
                  if (s.kind in ("weight", "embedding")) == weights]
        total = sum(s.elements for s in chosen)
        return sum(bits[s.name] * s.elements for s in chosen) / max(1, total)

    def weight_bytes(self, candidate: Candidate) -> float:
        bits = self.bits_of(candidate)
        return sum(bits[s.name] * s.elements / 8 for s in self.slots.values()
                   if s.kind in ("weight", "embedding"))

    def matmuls(self, name: str) -> int:
        """How many integer matmuls a quantizer's operand takes: 2 for a V-2SF operand (its fine
        and its coarse part, each b-bit, summed after a shift: ``quant.integer.encoders``),
        1 for every other (and for an FP or unknown operand)."""
        slot = self.slots.get(name)
        return 2 if slot is not None and slot.scheme == "v2sf" else 1

    def bitops(self, candidate: Candidate) -> float:
        """Σ MACs × bits of one operand × bits of the other, per image (FP operands count 32).

        A V-2SF operand (the post-Softmax input of A·V and the post-GELU input of fc2 under
        TSPTQ; PTQ4ViT's twin uniform too) is consumed as two integer matmuls, the fine part's
        and the coarse part's (``quant.integer.encoders``), so its MACs count twice."""
        bits = self.bits_of(candidate)
        return float(sum(m * max(self.matmuls(a), self.matmuls(b)) * bits.get(a, 32)
                         * bits.get(b, 32) for a, b, m in self.macs))


def _param_elements(model: nn.Module, quantizer_name: str) -> int:
    for pname, (prefix, _) in integer_parameters(model).items():
        if prefix == quantizer_name:
            return model.get_parameter(pname).numel()
    return 0


def candidate_of(qmodel: QuantizedModel) -> Candidate:
    """Read back the candidate a calibrated model embodies: every bit width that differs from
    its base config's, and the searchable parameters of the quantizers the config pinned."""
    factory = QuantizerFactory(qmodel.config)
    bits, pinned = {}, {}
    for name, q in qmodel.quantizers():
        if q.bits != factory.bits_for(q.kind):
            bits[name] = q.bits
        if name in qmodel.config.pinned:
            pinned[name] = chosen_parameters(q)
    return Candidate.make(bits, pinned)
