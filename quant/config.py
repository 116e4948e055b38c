"""The one typed object that says how a model is quantized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

METHODS = ("tsptq", "uniform", "twin", "ptf")
SETTINGS = ("full", "partial", "integer")
METRICS = ("mse", "cosine", "hessian")
OUTLIER_RULES = ("threshold", "sorted_split")
WEIGHT_ROUNDINGS = ("nearest", "gptq")

# Every kind of quantized tensor, each switchable alone for ablations.
KINDS = (
    "weight",        # Linear / Conv2d weights, per output channel, symmetric
    "linear_input",  # inputs of qkv, proj, fc1 and head (post-LayerNorm activations and more)
    "image",         # the patch-embedding convolution's input
    "qk",            # both operands of Q·Kᵀ
    "value",         # the V operand of A·V
    "post_softmax",  # the A operand of A·V
    "post_gelu",     # the input of fc2
    "ln_input",      # the input of every LayerNorm (the residual stream)
    "embedding",     # position embeddings and class tokens (8-bit, per channel)
)
# The "partial" setting of PTQ4ViT and RepQ-ViT keeps LayerNorm (and its input) in floating point.
PARTIAL_OFF = frozenset({"ln_input"})


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. ``method`` picks the quantizer family of the three special tensors:

    ============  ===============  ==============  ====================
    method        post-Softmax     post-GELU       LayerNorm input
    ============  ===============  ==============  ====================
    ``tsptq``     V-2SF            V-2SF           O-2SF
    ``twin``      twin uniform     twin (by sign)  uniform (per tensor)
    ``ptf``       log2             uniform         PTF (α ∈ {0..3})
    ``uniform``   uniform          uniform         uniform (per tensor)
    ============  ===============  ==============  ====================

    Everything else (weights per output channel, every other activation per tensor) is uniform
    for all methods, so a comparison isolates what each method does differently.
    """

    method: str = "tsptq"
    w_bits: int = 8
    a_bits: int = 8
    # "full": every operand quantized, the rest (residual adds, biases, Softmax, GELU, LayerNorm)
    # in float; "partial": LayerNorm and its input in float too (PTQ4ViT, RepQ-ViT); "integer":
    # the integer program a device runs (``quant.integer``): integer operands, int32
    # accumulators, dyadic requantization, integer Softmax, GELU and LayerNorm, the residual
    # stream in integers. The float twin is calibrated as under "full", then lowered.
    setting: str = "full"
    # PTQ4ViT's Hessian-guided metric: against MSE and cosine, the lowest validation KL over
    # every method and width on the digits ViT (``bench.choices``; BENCHMARKS.md, "Defaults
    # chosen on validation"). MiniLM's validation texts prefer MSE at W8A8 (one draw, 5%); one
    # metric serves every family, so that waits for a per-family choice and more draws.
    metric: str = "hessian"
    calib_size: int = 32
    seed: int = 0
    # Candidates per scale search (METHOD.md section 3 suggests 100; on the digits ViT's
    # validation images 50 has the lower KL: ``bench.choices``).
    search_points: int = 50
    # Rows (tokens) of each captured activation used to score candidates.
    search_rows: int = 2048
    outlier_rule: str = "threshold"
    # Beyond the paper: O-2SF on the inputs of qkv and fc1 too (tsptq only). None: the model
    # family's choice (``ModelAdapter.post_ln_two_scale``, ``setting_choices``): on for BERT
    # encoders, whose post-LayerNorm activations carry outlier channels of their own, and for
    # timm ViTs in the partial setting (with GPTQ: BENCHMARKS.md "Partial setting"); off for
    # timm ViT/Swin otherwise, though the digits ViT's validation images prefer it in the full
    # setting too (not switched: its fast ONNX graph would pay a Gather per exponent group on
    # every qkv and fc1 input). BENCHMARKS.md, "Defaults chosen on validation" (``bench.choices``).
    post_ln_two_scale: bool | None = None
    # RepQ-ViT's scale reparameterization of the qkv and fc1 inputs (``quant.reparam``): the peer
    # that ``post_ln_two_scale`` is measured against. timm ViTs with pre-norm blocks only (in a
    # post-norm block the LayerNorm output is the residual stream too, and cannot be rescaled).
    post_ln_reparam: bool = False
    # O-2SF: a channel whose grid cannot hold its range keeps its bulk (the end nearer zero)
    # and clips the far tail, where a clamped centred zero point clipped the bulk (see
    # ChannelPow2Quantizer). None: the family's choice (``ModelAdapter.keep_bulk``): off for
    # timm (the paper's grid; the digits ViT never meets the case: bit-identical either way), on
    # for BERT encoders (MiniLM's validation texts: BENCHMARKS.md, "Defaults chosen on
    # validation").
    keep_bulk: bool | None = None
    # Token 0 of every sequence gets input quantizers of its own, in every LayerNorm and Linear
    # (``quant.modules.first_token_input``; a departure from the paper). None: the family's
    # choice (``ModelAdapter.first_token_scale``): on for BERT encoders under tsptq (their [CLS]
    # token carries activations ~100x every other token's; validated in BENCHMARKS.md,
    # "Defaults chosen on validation"); off for timm ViTs (offered where the class token is
    # token 0; validation ties); not offered for Swin (a ValueError).
    first_token_scale: bool | None = None
    # V-2SF's coarse grid starts above the fine one, so no code is wasted (see quantizers.py; a
    # departure from the paper's grid). None: the family's choice
    # (``ModelAdapter.coarse_offset``): on for timm ViTs, chosen on validation (digits ViT: lower
    # validation KL over 3 calibration draws; ``bench.choices``, BENCHMARKS.md "Defaults chosen
    # on validation"); off for Swin (not measured) and BERT encoders (MiniLM: a KL tie that
    # validation agreement gives to it, not switched while the fast ONNX graph with it is not
    # padding-invariant, tests/test_export_onnx.py).
    coarse_offset: bool | None = None
    # V-2SF's post-GELU zero point raised (by at most 2^m − 2 codes, at 8 bits) so that the fine
    # top meets the coarse grid: the fast ONNX graph's fine operand then needs no pass (see
    # TwoScaleValueQuantizer; validation ties, the speed decides). Off: the paper's zero point.
    aligned_gelu_zero: bool = True
    # How weights are rounded to their codes: "nearest", or "gptq", GPTQ's error-compensating
    # rounding on the layer's input Hessian (``quant.rounding``; the statistics pass then also
    # gathers XᵀX of every weighted layer's inputs). The codes are codes either way. None: the
    # family's choice for the setting (``ModelAdapter.setting_choices``): GPTQ for timm ViTs in
    # the partial setting, nearest elsewhere.
    weight_rounding: str | None = None
    # Per-channel zero points on the LayerNorm input: None = the method's own choice (tsptq: per
    # channel; ptf: one shared zero point, as FQ-ViT's code does). Set it for ablations.
    channel_zero_points: bool | None = None
    # Kinds switched off on top of what the setting switches off (ablations).
    disabled: frozenset[str] = field(default_factory=frozenset)
    # Bits of the image input: pixels are 8-bit data already, as in FQ-ViT and RepQ-ViT.
    image_bits: int = 8
    # Per-quantizer overrides, keyed by the quantizer's name in the model (the names
    # ``QuantizedModel.quantizers()`` yields, e.g. "blocks.0.attn.qkv.weight_q"): its bit width,
    # and search parameters pinned to one value (e.g. {"shift": 3} for V-2SF, {"threshold": 4.0,
    # "exponent": 3} for O-2SF, {"alpha": 0.9} for uniform). A search strategy's candidate is one.
    bit_overrides: dict[str, int] = field(default_factory=dict, hash=False)
    pinned: dict[str, dict] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.outlier_rule not in OUTLIER_RULES:
            raise ValueError(f"outlier_rule must be one of {OUTLIER_RULES}")
        if self.weight_rounding not in (*WEIGHT_ROUNDINGS, None):
            raise ValueError(f"weight_rounding must be one of {WEIGHT_ROUNDINGS}, "
                             f"got {self.weight_rounding!r}")
        for name in ("w_bits", "a_bits", "image_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"{name} must be an integer in [2, 16], got {v!r}")
        if self.a_bits < 3 and self.method in ("tsptq", "twin"):
            raise ValueError("two-scale quantizers need a_bits >= 3")
        for name in ("calib_size", "search_points", "search_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        for name, bits in self.bit_overrides.items():
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
                raise ValueError(f"bit_overrides[{name!r}] must be an integer in [2, 16], "
                                 f"got {bits!r}")
        for name, params in self.pinned.items():
            if not isinstance(params, dict):
                raise ValueError(f"pinned[{name!r}] must be a mapping of parameter to value")
        if self.post_ln_reparam and self.post_ln_two_scale:
            raise ValueError("post_ln_reparam and post_ln_two_scale are alternatives for the same "
                             "activations: choose one")
        if self.setting == "integer" and self.disabled:
            raise ValueError("the integer setting quantizes every tensor: it takes no disabled "
                             f"kinds, got {sorted(self.disabled)}")
        unknown = set(self.disabled) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown tensor kinds {sorted(unknown)}; known: {KINDS}")

    def enabled(self, kind: str) -> bool:
        if kind in self.disabled:
            return False
        return not (self.setting == "partial" and kind in PARTIAL_OFF)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["disabled"] = sorted(self.disabled)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}")
        d = dict(d)
        if "disabled" in d:
            d["disabled"] = frozenset(d["disabled"])
        return cls(**d)
