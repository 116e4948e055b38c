"""Quantizers: uniform, V-2SF (and PTQ4ViT's twin uniform), per-channel power-of-two (O-2SF and
FQ-ViT's PTF) and log2 (FQ-ViT's softmax).

Every quantizer maps a float tensor to unsigned *codes* in [0, 2^b - 1] (what a checkpoint or an
accelerator stores), codes to a signed *integer operand* (what the next integer matmul consumes)
and carries a *step* such that the dequantized value is exactly ``integer * step``. ``forward``
is computed through that same path, so the float model and its integer rebuild agree bit for bit.

Calibration (choosing the parameters) lives beside each quantizer in ``calibrate``, because the
candidate set is specific to each scheme; the error metric comes from the caller
(``quant.metrics``), which knows the consumer of the quantized tensor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

# Error of a candidate dequantized tensor, measured on the consuming layer's output.
LossFn = Callable[[Tensor], Tensor]
# Per-channel variant (weights): returns one error per output channel.
ChannelLossFn = Callable[[Tensor], Tensor]

# GELU(x) >= -0.1700 for every x (its minimum, at x = -0.7518).
GELU_MIN = -0.17


def _grid(points: int, low: float = 0.05, high: float = 1.2) -> list[float]:
    """Fractions of the min-max scale to try (METHOD.md section 3 suggests [0.01, 1.2]·Δmax; below
    0.05 nothing ever wins at 4 bits or more, so we spend the points where they matter)."""
    if points <= 1:
        return [1.0]
    return [low + (high - low) * i / (points - 1) for i in range(points)]


# Coarse-to-fine search of a grid of clipping fractions: every STRIDE-th point (and the last)
# first, then the points half as far on either side of the best so far, and so on down to
# the neighbours: 14 evaluations of a 50-point grid instead of 50, and the same choice
# wherever the error is unimodal along the grid. Each evaluation is a consumer's output on
# every sampled row, the bulk of calibration's time (BENCHMARKS.md, "Calibration speed and
# statistics at real size", has the profile and the accuracy before and after).
SEARCH_STRIDE = 8
# Below this width the error along the grid has steps a coarse search cannot see past (16
# levels at 4 bits): searches there score the full grid. Measured on the digits ViT over 3
# calibration draws: W4A8's KL to FP32 1.07x the full grid's (up to 1.14x) with coarse
# weight searches, 1.01x with full ones at 4 bits (BENCHMARKS.md).
COARSE_MIN_BITS = 6
# Where a candidate costs little the full grid is kept: searches go coarse to fine only on
# tensors of at least this many values (activations), or weights of at least WEIGHT_ELEMENTS
# (a weight's candidates are scored on 512 rows). Every search of the digits ViT stays on its
# full grid (its calibration is bit-identical to the full grid's); a 224x224 model's are
# coarse to fine (deit_tiny: its smallest searched activation has 393K values).
COARSE_MIN_ELEMENTS = 1 << 18
COARSE_MIN_WEIGHT_ELEMENTS = 1 << 15


def _coarse(bits: int, elements: int, least: int = COARSE_MIN_ELEMENTS) -> bool:
    return bits >= COARSE_MIN_BITS and elements >= least


def _coarse_indices(n: int, stride: int) -> list[int]:
    if n <= 2 * stride:
        return list(range(n))
    return sorted({*range(0, n, stride), n - 1})


def _centres(n: int) -> list[int]:
    """Indices 1, 3, 5, …, and n − 1 if it has no neighbour among them: every index is one."""
    out = list(range(1, n, 2)) or [0]
    return out + [n - 1] if n - 1 > out[-1] + 1 else out


def _halvings(stride: int) -> list[int]:
    out = []
    while stride > 1:
        stride //= 2
        out.append(stride)
    return out


def coarse_to_fine(n: int, score: Callable[[int], float], stride: int | None = None) -> int:
    """The index in [0, n) of the lowest ``score`` (the first of equal ones; NaN never, and
    -1 if every score is infinite), scoring the coarse points, then at each halving of the
    stride the two points that far from the best so far."""
    stride = stride or SEARCH_STRIDE
    errs: dict[int, float] = {}

    def best() -> int:
        return min(errs, key=lambda i: (errs[i], i))

    def get(i: int) -> None:
        if 0 <= i < n and i not in errs:
            e = score(i)
            errs[i] = e if e == e else float("inf")

    for i in _coarse_indices(n, stride):
        get(i)
    for step in _halvings(stride):
        b = best()
        get(b - step)
        get(b + step)
    return best() if errs[best()] < float("inf") else -1


_FP16 = torch.finfo(torch.float16)


def _fp16_exact(t: Tensor) -> Tensor:
    """Round scales *up* to float16 precision, so a checkpoint stores them losslessly in 2 bytes
    and a min-max grid still reaches its maximum. Scales outside float16's normal range stay in
    float32 (the checkpoint then stores that tensor in float32)."""
    t = t.float()
    h = t.to(torch.float16)
    h = torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    normal = (t >= _FP16.tiny) & (t <= _FP16.max / 2)
    return torch.where(normal, h.float(), t).clamp_min(1e-30)


class Quantizer(nn.Module, ABC):
    """Base class. Subclasses implement ``codes``, ``integer`` and ``step``."""

    scheme: str = "base"
    # Search parameters a caller may pin (``restrict``), e.g. a search strategy's candidate.
    restrictable: frozenset[str] = frozenset()

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = 0
        self.set_bits(bits)
        self.restrict: dict = {}
        self.enabled = True
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # Optional SQNR probe: accumulated signal and noise power over forward passes.
        self.probe: dict[str, float] | None = None

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def set_bits(self, bits: int) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
        self.bits = bits

    def set_restrict(self, params: dict) -> None:
        unknown = set(params) - self.restrictable
        if unknown:
            raise ValueError(f"{self.scheme} quantizer: cannot pin {sorted(unknown)}; "
                             f"it accepts {sorted(self.restrictable)}")
        self.restrict = dict(params)

    @abstractmethod
    def codes(self, x: Tensor) -> Tensor:
        """Unsigned codes in [0, 2^b − 1], as stored."""

    @abstractmethod
    def integer(self, codes: Tensor) -> Tensor:
        """The signed integer operand the next integer matmul consumes."""

    @abstractmethod
    def step(self, x: Tensor) -> Tensor:
        """The scale(s) of the integer operand, broadcastable to ``x``."""

    def dequantize(self, codes: Tensor, like: Tensor) -> Tensor:
        return self.integer(codes).to(like.dtype) * self.step(like)

    def fake_quant(self, x: Tensor) -> Tensor:
        return self.dequantize(self.codes(x), x)

    def search_quant(self, x: Tensor) -> Tensor:
        """``fake_quant(x)`` bit for bit, for scoring search candidates and for the simulator's
        forward pass: subclasses compute it in floating point, without the integer codes
        (exact: every code is an integer below 2^24), in fewer passes."""
        return self.fake_quant(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or not bool(self.calibrated):
            return x
        # The same values either way; the in-place passes of ``search_quant`` stay out of a
        # graph that autograd records. Measured on deit_tiny, 32 images, one thread: the
        # quantized forward pass 2.66 s through the codes, 1.50 s (FP32: 0.75 s).
        recorded = torch.is_grad_enabled() and x.requires_grad
        y = self.fake_quant(x) if recorded else self.search_quant(x)
        if self.probe is not None:
            xd = x.detach().double()
            self.probe["signal"] += float((xd * xd).sum())
            self.probe["noise"] += float(((xd - y.detach().double()) ** 2).sum())
        return y

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, bits={self.bits}"

    def describe(self) -> dict:
        """Plain-JSON summary of the chosen parameters, for reports."""
        return {"scheme": self.scheme, "bits": self.bits}


def _bcast(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class UniformQuantizer(Quantizer):
    """x̂ = s·(clip(round(x/s) + z, 0, 2^b−1) − z), per tensor or per channel along ``axis``.

    Symmetric quantizers fix z = 2^(b−1) (a signed integer operand); asymmetric ones choose z.
    """

    scheme = "uniform"
    restrictable = frozenset({"alpha"})  # the clipping fraction of the min-max range

    def __init__(self, bits: int, symmetric: bool = False, axis: int | None = None,
                 channels: int = 1) -> None:
        self.symmetric = symmetric
        super().__init__(bits)
        self.axis = axis
        n = channels if axis is not None else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.full((n,), self._sym_zero(), dtype=torch.int32)
                             if symmetric else torch.zeros(n, dtype=torch.int32))

    def _sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def set_bits(self, bits: int) -> None:
        super().set_bits(bits)
        if self.symmetric and hasattr(self, "zero_point"):
            self.zero_point.fill_(self._sym_zero())

    def codes(self, x: Tensor) -> Tensor:
        s = _bcast(self.scale, x, self.axis)
        z = _bcast(self.zero_point, x, self.axis)
        return (torch.round(x / s) + z).clamp_(0, self.levels - 1).to(torch.int32)

    def integer(self, codes: Tensor) -> Tensor:
        return codes - _bcast(self.zero_point, codes, self.axis)

    def step(self, x: Tensor) -> Tensor:
        return _bcast(self.scale, x, self.axis)

    def search_quant(self, x: Tensor) -> Tensor:
        # clamp(round(x/s) + z, 0, top) − z = clamp(round(x/s), −z, top − z) on integers;
        # scalar bounds where the zero point is one (per tensor, or symmetric: a clamp to
        # tensors is several times slower)
        s = _bcast(self.scale, x, self.axis)
        z = _bcast(self.zero_point, x, self.axis)
        if self.symmetric or z.numel() == 1:
            z = self._sym_zero() if self.symmetric else int(z)
        else:
            z = z.to(x.dtype)
        return (x / s).round_().clamp_(-z, self.levels - 1 - z).mul_(s)

    def _alphas(self, points: int, low: float) -> list[float]:
        return [float(self.restrict["alpha"])] if "alpha" in self.restrict else _grid(points, low)

    def set_from_range(self, lo: Tensor, hi: Tensor, alpha: float | Tensor = 1.0) -> None:
        """Scale and zero point covering [lo, hi] shrunk by ``alpha`` (per channel when vectors)."""
        lo = torch.minimum(lo.float(), torch.zeros_like(lo.float()))
        hi = torch.maximum(hi.float(), torch.zeros_like(hi.float()))
        if self.symmetric:
            amax = torch.maximum(-lo, hi) * alpha
            scale = _fp16_exact(amax / ((self.levels >> 1) - 0.5))
            zp = torch.full_like(scale, self._sym_zero(), dtype=torch.int32)
        else:
            scale = _fp16_exact((hi - lo) * alpha / (self.levels - 1))
            zp = torch.round(-lo * alpha / scale).clamp(0, self.levels - 1).to(torch.int32)
        self.scale = scale.reshape(self.scale.shape).to(self.scale.device)
        self.zero_point = zp.reshape(self.zero_point.shape).to(self.zero_point.device)
        self.calibrated.fill_(True)

    def calibrate(self, x: Tensor, loss: LossFn, points: int = 50,
                  channel_loss: ChannelLossFn | None = None) -> None:
        """Grid search of the clipping range around min-max under ``loss``.

        Per-channel quantizers (weights) search every channel at once under ``channel_loss``,
        which must return one error per channel (the metric is separable over output channels).
        """
        if self.axis is not None:
            dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
            lo = x.amin(dim=dims)
            hi = x.amax(dim=dims)
            assert channel_loss is not None, "per-channel calibration needs a channel loss"
            alphas = self._alphas(points, 0.3)
            self.set_from_range(lo, hi, self._channel_search(lo, hi, alphas, x, channel_loss))
            return
        lo, hi = x.min(), x.max()
        alphas = self._alphas(points, 0.05)

        def score(i: int) -> float:
            self.set_from_range(lo, hi, alphas[i])
            return float(loss(self.search_quant(x)))

        i = coarse_to_fine(len(alphas), score,
                           None if _coarse(self.bits, x.numel()) else len(alphas))
        self.set_from_range(lo, hi, alphas[i] if i >= 0 else 1.0)

    def _channel_search(self, lo: Tensor, hi: Tensor, alphas: list[float], x: Tensor,
                        channel_loss: ChannelLossFn) -> Tensor:
        """Each channel's clipping fraction, coarse to fine (``coarse_to_fine``) per channel:
        each refinement scores, for every channel at once, the two points at that distance
        from the channel's own best so far (the full grid where ``_coarse`` says so)."""
        n = len(alphas)
        coarse = _coarse(self.bits, x.numel(), COARSE_MIN_WEIGHT_ELEMENTS)
        stride = SEARCH_STRIDE if coarse else n
        grid = torch.tensor(alphas, dtype=torch.float32, device=lo.device)
        errs = torch.full((n, lo.numel()), float("inf"), device=lo.device)
        seen = torch.zeros((n, lo.numel()), dtype=torch.bool, device=lo.device)
        cols = torch.arange(lo.numel(), device=lo.device)

        def keep(i: Tensor, err: Tensor, valid: Tensor) -> None:
            err = torch.nan_to_num(err.float(), nan=float("inf")).reshape(-1)
            c = cols[valid]
            errs[i[c], c] = err[c]
            seen[i[c], c] = True

        every = torch.ones_like(cols, dtype=torch.bool)
        for i in _coarse_indices(n, stride):
            self.set_from_range(lo, hi, alphas[i])
            keep(torch.full_like(cols, i), channel_loss(self.search_quant(x)), every)
        for step in _halvings(stride) if n > 2 * stride else ():
            best = errs.argmin(0)  # the first of equal errors
            for i in (best - step, best + step):
                valid = (i >= 0) & (i < n)
                i = i.clamp(0, n - 1)
                valid &= ~seen[i, cols]
                if not bool(valid.any()):
                    continue
                self.set_from_range(lo, hi, grid[i].reshape(lo.shape))
                keep(i, channel_loss(self.search_quant(x)), valid)
        found = errs.amin(0) < float("inf")
        return torch.where(found, grid[errs.argmin(0)], 1.0).reshape(lo.shape)

    def describe(self) -> dict:
        d = super().describe()
        if self.scale.numel() == 1:
            d.update(scale=float(self.scale), zero_point=int(self.zero_point))
        else:
            d.update(granularity="channel", channels=self.scale.numel())
        return d


class TwoScaleValueQuantizer(Quantizer):
    """V-2SF: a b-bit code is a region flag and a (b−1)-bit payload p (METHOD.md section 1).

    Fine region (flag 0): integer operand ``p − z``; coarse region (flag 1): ``p << m``; one scale
    s for both, so the coarse step is S = 2^m·s and the next matmul needs only a shift. The region
    is chosen with a mask, never by adding two clamped branches.

    Code share (METHOD.md section 4, "when not an even split"): by default the fine region owns
    the lower half of the 2^b codes (the flag is the top bit). ``fine_codes`` F moves that
    boundary: codes below F are fine payloads, codes from F up are coarse payloads, so the
    decoder compares with F instead of testing a bit. A search pins it as ``fine_share`` = F/2^b.

    ``coarse_offset`` (an option beyond the paper; each family's choice, on for timm ViTs, where
    it lowers the validation KL, BENCHMARKS.md "Defaults chosen on validation"): the coarse grid
    starts at its first point above the fine grid, ``(p + c) << m`` with c = ⌊F/2^m⌋ + 1 for the
    fine top F, instead of at zero. Without it the coarse codes below the split duplicate fine
    values and are never used (half of them at 4 bits); with it every code is a distinct value,
    which lets the scale shrink by (c + 2^(b−1) − 1)/(2^(b−1) − 1) for the same range. The
    integer operand costs one add before the shift. It raises SQNR by 1 to 2 dB. PTQ4ViT's twin
    uniform keeps both grids starting at zero.

    ``aligned_zero`` (an option beyond the paper, on by default): at 8 bits, a post-GELU fine
    zero point z is raised by the fewest codes (at most 2^m − 2) that put the fine top
    t = F − 1 − z on t ≡ 0 or −1 (mod 2^m). The fine grid then ends on, or next to, a coarse
    point, and the fast ONNX graph writes the fine operand in no pass instead of five (a step at
    τ: ``export.qdq_builder.QdqGraph._v2sf``). The negative tail keeps its codes: z only grows.
    Validation ties: MiniLM integer W8A8 cosine 0.99874 → 0.99875, NN 92.97% → 94.14% (256
    texts); digits ViT KL 9.09e-5 → 9.16e-5 integer and 9.35e-5 → 9.53e-5 full (512 images).
    The speed decides: MiniLM's fast graph runs ~1.07–1.10× faster (BENCHMARKS.md, "Deployment").

    ``region_rule`` picks how values are split between the regions:
    * ``"value"`` (TSPTQ-ViT): by magnitude. Small values (including GELU's negative tail, through
      the fine zero point z) take the fine grid; values beyond it take the coarse grid.
    * ``"sign"`` (PTQ4ViT's twin uniform for post-GELU): negatives take the fine grid, every
      non-negative value the coarse grid.
    """

    scheme = "v2sf"
    # m (with the range it fixes the split threshold τ) and the fine region's share of codes.
    restrictable = frozenset({"shift", "fine_share"})

    def __init__(self, bits: int, region_rule: str = "value", signed: bool = False,
                 coarse_offset: bool = False, aligned_zero: bool = False) -> None:
        super().__init__(bits)
        if region_rule not in ("value", "sign"):
            raise ValueError(f"unknown region rule {region_rule!r}")
        self.region_rule = region_rule
        self.signed = signed  # True for post-GELU (a negative tail), False for post-Softmax
        self.coarse_offset = coarse_offset and region_rule == "value"
        self.aligned_zero = aligned_zero and region_rule == "value"
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int32))  # m
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))  # z, fine region
        self.register_buffer("fine_codes", torch.tensor(1 << (bits - 1), dtype=torch.int32))

    @property
    def payload_max(self) -> int:
        """The fine region's top payload."""
        return int(self.fine_codes) - 1

    @property
    def coarse_max(self) -> int:
        return self.levels - int(self.fine_codes) - 1

    def set_bits(self, bits: int) -> None:
        if isinstance(bits, int) and bits < 3:
            raise ValueError("a two-scale quantizer needs at least 3 bits")
        super().set_bits(bits)
        if "fine_codes" in self._buffers:  # not yet during the base class's __init__
            self.set_fine_share(0.5)

    def set_fine_share(self, share: float) -> None:
        """Give the fine region round(share·2^b) codes, at least 2 and leaving the coarse two."""
        if not 0.0 < share < 1.0:
            raise ValueError(f"fine_share must lie in (0, 1), got {share}")
        codes = min(max(round(share * self.levels), 2), self.levels - 2)
        self.fine_codes = torch.tensor(codes, dtype=torch.int32, device=self.scale.device)

    def _coarse_start(self, shift: int, zero_point: int) -> int:
        """c: the coarse payload's offset (0 without ``coarse_offset``)."""
        if not self.coarse_offset:
            return 0
        return ((self.payload_max - zero_point) >> shift) + 1

    def _threshold(self) -> Tensor:
        """Switch to the coarse grid halfway between the fine top and the next coarse point above
        it, which keeps the quantizer monotone and its error within half a (coarse) step."""
        s = self.scale
        if self.region_rule == "sign":
            return torch.zeros((), device=s.device)
        fine_top = self.payload_max - int(self.zero_point)
        coarse_next = ((fine_top >> int(self.shift)) + 1) << int(self.shift)
        return s * (fine_top + coarse_next) / 2

    def codes(self, x: Tensor) -> Tensor:
        s, m, z = self.scale, int(self.shift), self.zero_point
        c = self._coarse_start(m, int(z))
        flag = x >= self._threshold()
        fine = (torch.round(x / s) + z).clamp_(0, self.payload_max)
        coarse = (torch.round(x / (s * (1 << m))) - c).clamp_(0, self.coarse_max)
        return torch.where(flag, coarse + int(self.fine_codes), fine).to(torch.int32)

    def search_quant(self, x: Tensor) -> Tensor:
        # clamp(round(x/s) + z, 0, top) − z = clamp(round(x/s), −z, top − z) on integers, and
        # powers of two scale exactly: x/(s·2^m) = (x/s)·2^−m (what rounds to a nonzero
        # integer is far from subnormal) and (p + c)·2^m·s = (p + c)·(s·2^m). Fewer passes,
        # one division, the same values; the fine grid and the selection are written in place
        # (on a post-GELU tensor of 4.8 M values, one thread: 33 ms before, 18-20 ms). The
        # selection is a lerp by a 0/1 flag in x's dtype, exactly a select (lerp computes
        # r + 0·(coarse − r) at weight 0 and coarse − (coarse − r)·0 at 1, all finite):
        # comparisons into bool and ``where`` on bool run scalar loops on some CPU builds
        # (AVX2: 11 ms for the two on 2.3 M values, 3 ms for these).
        s, m, z = self.scale, int(self.shift), int(self.zero_point)
        c = self._coarse_start(m, z)
        big = s * (1 << m)
        r = x / s
        coarse = (r * 2.0 ** -m).round_().clamp_(c, c + self.coarse_max).mul_(big)
        r.round_().clamp_(-z, self.payload_max - z).mul_(s)
        flag = torch.ge(x, self._threshold(), out=torch.empty_like(x))
        return torch.lerp(r, coarse, flag, out=r)

    def integer(self, codes: Tensor) -> Tensor:
        boundary = int(self.fine_codes)
        flag = codes >= boundary
        p = codes - flag.to(torch.int32) * boundary
        m = int(self.shift)
        c = self._coarse_start(m, int(self.zero_point))
        return torch.where(flag, (p + c) << m, p - self.zero_point)

    def step(self, x: Tensor) -> Tensor:
        return self.scale

    @property
    def split_threshold(self) -> float:
        """τ: where the fine grid saturates."""
        return float(self.scale) * (self.payload_max - int(self.zero_point))

    def set_params(self, scale: float, shift: int, zero_point: int = 0) -> None:
        dev = self.scale.device
        self.scale = _fp16_exact(torch.tensor(float(scale), device=dev))
        self.shift = torch.tensor(int(shift), dtype=torch.int32, device=dev)
        self.zero_point = torch.tensor(int(zero_point), dtype=torch.int32, device=dev)
        self.calibrated.fill_(True)

    def _zero_for(self, scale: float, x_min: float, shift: int = 0) -> int:
        if not self.signed or x_min >= 0:
            return 0
        if self.region_rule == "sign":
            # Fine grid holds only negatives: every fine code but 0 sits below zero.
            return self.payload_max
        # Negative codes of the fine grid: enough for the tail, at most half the fine codes.
        most = (self.payload_max + 1) // 2
        z = min(math.ceil(-x_min / scale - 1e-6), most)
        if not (self.aligned_zero and self.bits == 8):
            return z
        step = 1 << shift
        for aligned in range(z, min(z + step, most + 1)):  # see ``aligned_zero``
            if (self.payload_max - aligned) % step in (0, step - 1):
                return aligned
        return z

    def calibrate(self, x: Tensor, loss: LossFn, points: int = 50, max_shift: int = 7) -> None:
        self.set_fine_share(float(self.restrict.get("fine_share", 0.5)))
        x_min, x_max = float(x.min()), float(x.max())
        best: tuple[float, tuple[float, int, int]] = (float("inf"), (1.0, 0, 0))
        plane = None  # (clippings, shifts) when the candidates are that grid, clipping-major
        if not self.signed:
            # post-Softmax (x in [0, 1]): the coarse grid reaches 1 exactly, search m only.
            candidates = [(1.0 / ((self._coarse_start(m, 0) + self.coarse_max) << m), m)
                          for m in range(0, max_shift + 1)]
        elif self.region_rule == "sign":
            # PTQ4ViT twin uniform for GELU: fine grid fixed by the negative tail; search the
            # coarse (positive) scale, constrained to 2^m times the fine one.
            fine = max(-min(x_min, 0.0), 2.0 ** -10 * max(x_max, 1e-6)) / self.payload_max
            candidates = []
            for a in _grid(points):
                want = a * x_max / self.coarse_max
                m = min(16, max(0, round(math.log2(max(want / fine, 1.0)))))
                candidates.append((fine, m))
            candidates = sorted(set(candidates))
        else:
            # V-2SF for GELU: the coarse scale S sets the clipping range; m sets the split.
            candidates = []
            n = max(4, points // max_shift)
            plane = (n, max_shift) if _coarse(self.bits, x.numel()) else None
            for a in _grid(n, 0.3):
                top = a * x_max  # the coarse grid's last point
                for m in range(1, max_shift + 1):
                    s = top / (self.coarse_max << m)
                    c = self._coarse_start(m, self._zero_for(s, x_min, m))
                    candidates.append((top / ((c + self.coarse_max) << m), m))
        if "shift" in self.restrict:  # keep each candidate's coarse step S = s·2^m, pin m
            pinned = int(self.restrict["shift"])
            candidates = sorted({(s * 2.0 ** (m - pinned), pinned) for s, m in candidates})
            plane = None
        done: dict[int, tuple[float, tuple[float, int, int], bool]] = {}

        def score(i: int) -> None:
            scale, m = candidates[i]
            self.set_params(scale, m, self._zero_for(scale, x_min, m))
            err = float(loss(self.search_quant(x)))
            done[i] = (err, (scale, m, int(self.zero_point)), self._coarse_reaches_fine_top())

        for i in self._first_candidates(len(candidates), plane):
            score(i)
        if len(done) < len(candidates):  # the plane's coarse points: now around the best
            ok = [i for i, (e, _, mono) in done.items() if mono and e < float("inf")]
            near = (range(len(candidates)) if not ok else
                    self._plane_near(min(ok, key=lambda i: (done[i][0], i)), plane))
            for i in near:
                if i not in done:
                    score(i)
        fallback = best
        for i in sorted(done):  # in candidate order: the first of equal errors wins
            err, params, monotone = done[i]
            if not monotone:
                # a coarse grid that tops out below the fine one is not monotone (few coarse
                # codes, as at 3 bits with most codes fine): only if nothing else is offered
                fallback = min(fallback, (err, params))
            elif err < best[0]:
                best = (err, params)
        self.set_params(*(best if best[0] < float("inf") else fallback)[1])

    @staticmethod
    def _first_candidates(count: int, plane: tuple[int, int] | None) -> list[int]:
        """Every candidate, or on a (clipping × shift) plane every other clipping and shift,
        so that every candidate neighbours one of them: the coarse points of a search that
        then scores the neighbours of the best (``_plane_near``), 17 of 49 candidates at 8
        bits, and the same choice wherever the error is unimodal on the plane. Each
        candidate is an fc2 output on every sampled row."""
        if plane is None:
            return list(range(count))
        na, nm = plane
        return [a * nm + m for a in _centres(na) for m in _centres(nm)]

    @staticmethod
    def _plane_near(best: int, plane: tuple[int, int]) -> list[int]:
        na, nm = plane
        a0, m0 = divmod(best, nm)
        return [a * nm + m for a in range(max(0, a0 - 1), min(na, a0 + 2))
                for m in range(max(0, m0 - 1), min(nm, m0 + 2))]

    def _coarse_reaches_fine_top(self) -> bool:
        m, z = int(self.shift), int(self.zero_point)
        return (self._coarse_start(m, z) + self.coarse_max) << m >= self.payload_max - z

    def describe(self) -> dict:
        d = super().describe()
        d.update(scale=float(self.scale), shift=int(self.shift), zero_point=int(self.zero_point),
                 coarse_start=self._coarse_start(int(self.shift), int(self.zero_point)),
                 split_threshold=self.split_threshold, region_rule=self.region_rule,
                 fine_codes=int(self.fine_codes))
        return d


class ChannelPow2Quantizer(Quantizer):
    """One scale s for the tensor, a power-of-two exponent e_c per channel (last axis):
    x̂_c = s·2^(e_c)·(q − z_c). The integer operand is ``(q − z_c) << e_c`` under the single scale
    s, so an integer LayerNorm aligns channels with a shift before it sums.

    O-2SF and FQ-ViT's PTF are this quantizer; they differ only in how exponents are chosen:
    * ``"o2sf"``: e_c ∈ {0, k}: one flag bit per channel marks outliers (TSPTQ-ViT).
    * ``"ptf"``: e_c ∈ {0, 1, 2, 3}, each channel picking the exponent with the least error.

    Zero points: FQ-ViT's PTF shares one zero point across channels (``shared_zero=True``, as
    its code does). O-2SF here centres each channel with its own zero point, a departure from the
    paper: the residual stream's channels carry offsets of their own, centring costs one integer
    per channel (a constant the integer LayerNorm subtracts) and lets a channel's *half range*
    rather than its absolute maximum decide whether it is an outlier. ``keep_bulk`` (another
    departure, on for BERT encoders: ``QuantConfig.keep_bulk``) changes where a channel too wide
    for its grid is clipped (``_bulk_zero``).
    """

    scheme = "pow2"
    # O-2SF's outlier threshold T (× the median channel range) and outlier exponent k.
    restrictable = frozenset({"threshold", "exponent"})

    def __init__(self, bits: int, channels: int, rule: str = "o2sf",
                 outlier_rule: str = "threshold", shared_zero: bool = False,
                 keep_bulk: bool = False) -> None:
        super().__init__(bits)
        if rule not in ("o2sf", "ptf"):
            raise ValueError(f"unknown exponent rule {rule!r}")
        if outlier_rule not in ("threshold", "sorted_split"):
            raise ValueError(f"unknown outlier rule {outlier_rule!r}")
        self.rule = rule
        self.outlier_rule = outlier_rule
        self.shared_zero = shared_zero
        self.keep_bulk = keep_bulk
        self.chosen_threshold: float | None = None  # T of the winning candidate (not saved)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("exponent", torch.zeros(channels, dtype=torch.int32))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))

    def codes(self, x: Tensor) -> Tensor:
        sc = self.scale * torch.pow(2.0, self.exponent.float())
        return (torch.round(x / sc) + self.zero_point).clamp_(0, self.levels - 1).to(torch.int32)

    def integer(self, codes: Tensor) -> Tensor:
        return (codes - self.zero_point) << self.exponent

    def search_quant(self, x: Tensor) -> Tensor:
        # (p − z)·2^e·s = (p − z)·(s·2^e) exactly: one clamp to [−z, top − z] and a product
        sc = self.scale * torch.pow(2.0, self.exponent.float())
        z = self.zero_point
        return (x / sc).round_().clamp_(-z, self.levels - 1 - z).mul_(sc)

    def step(self, x: Tensor) -> Tensor:
        return self.scale

    def set_params(self, scale: float | Tensor, exponent: Tensor, lo: Tensor, hi: Tensor) -> None:
        self.scale = _fp16_exact(torch.as_tensor(scale, dtype=torch.float32,
                                                 device=self.scale.device).reshape(()))
        self.exponent = exponent.to(torch.int32).to(self.exponent.device)
        if self.shared_zero:  # FQ-ViT: from the global minimum at the coarsest channel scale
            coarsest = self.scale * 2.0 ** int(self.exponent.max())
            zp = torch.round(-lo.min().clamp_max(0) / coarsest).expand_as(lo)
        else:
            sc = self.scale * torch.pow(2.0, self.exponent.float())
            zp = torch.round((self.levels - 1) / 2 - (hi + lo) / 2 / sc)
            if self.keep_bulk:
                zp = self._bulk_zero(zp, sc, lo, hi)
        self.zero_point = zp.clamp(0, self.levels - 1).to(torch.int32).contiguous()
        self.calibrated.fill_(True)

    def _bulk_zero(self, zp: Tensor, sc: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Where the centred zero point falls outside the codes (a grid much narrower than a
        one-sided range), clamping it would put the grid's end at zero and clip the channel's
        bulk on the other side; instead keep the end nearer zero and clip the far tail. MiniLM's
        [CLS] token alone drives its channel 99 to ~100x the median: the search clips that one
        value rather than coarsen every token's channel 99, and the bulk must survive."""
        top = self.levels - 1
        ends = torch.where(-lo <= hi, torch.round(-lo / sc), torch.round(top - hi / sc))
        return torch.where((zp < 0) | (zp > top), ends, zp)

    @property
    def outlier_channels(self) -> list[int]:
        return torch.nonzero(self.exponent > 0).flatten().tolist()

    def calibrate(self, x: Tensor, loss: LossFn, points: int = 50,
                  lo: Tensor | None = None, hi: Tensor | None = None,
                  thresholds: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0),
                  max_exponent: int = 6, max_splits: int = 32) -> None:
        """``lo``/``hi``: per-channel min and max over all calibration tokens (``x`` may be a
        sample of the rows)."""
        x2 = x.reshape(-1, x.shape[-1])
        lo = x2.amin(0) if lo is None else lo.to(x2)
        hi = x2.amax(0) if hi is None else hi.to(x2)
        half = ((hi - lo) / 2).clamp_min(1e-8)
        self.chosen_threshold = None
        if self.rule == "ptf":
            self._calibrate_ptf(x2, lo, hi, half)
            return
        order = torch.argsort(half)
        labels: dict[bytes, float] = {}
        if "threshold" in self.restrict:
            thresholds = (float(self.restrict["threshold"]),)
        if "threshold" in self.restrict or self.outlier_rule == "threshold":
            med = half.median()
            masks = [half > t * med for t in thresholds]
            for t, m in zip(thresholds, masks, strict=True):
                labels.setdefault(m.cpu().numpy().tobytes(), t)
        else:  # splits of the sorted ranges (every one, or max_splits evenly spaced ones)
            c = half.numel()
            masks = []
            for n_out in sorted({round(1 + i * (c - 2) / max(1, max_splits - 1))
                                 for i in range(min(max_splits, c - 1))}):
                m = torch.zeros_like(half, dtype=torch.bool)
                m[order[c - n_out:]] = True
                masks.append(m)
        if "threshold" not in self.restrict:
            masks = [torch.zeros_like(half, dtype=torch.bool)] + masks
        seen: set[bytes] = set()
        best: tuple[float, tuple] = (float("inf"), ())
        n_alpha = max(4, points // 5)
        for mask in masks:
            key = mask.cpu().numpy().tobytes()
            if key in seen or bool(mask.all()):
                continue
            seen.add(key)
            normal_max = float(half[~mask].max())
            if mask.any():
                ratio = float(half[mask].max()) / normal_max
                ks = sorted({max(1, min(max_exponent, math.ceil(math.log2(ratio)) + d))
                             for d in (-1, 0, 1)})
            else:
                ks = [0]
            if "exponent" in self.restrict and mask.any():
                ks = [int(self.restrict["exponent"])]
            for k in ks:
                exp = mask.to(torch.int32) * k
                for a in _grid(n_alpha, 0.4):
                    s = a * 2 * normal_max / (self.levels - 1)
                    self.set_params(s, exp, lo, hi)
                    err = float(loss(self.search_quant(x)))
                    if err < best[0]:
                        best = (err, (s, exp))
                        self.chosen_threshold = labels.get(key)
        self.set_params(best[1][0], best[1][1], lo, hi)

    def _calibrate_ptf(self, x2: Tensor, lo: Tensor, hi: Tensor, half: Tensor) -> None:
        """FQ-ViT: base scale from the global min-max divided by 2^3; each channel takes the
        exponent α ∈ {0..3} with the least quantization error of its own values."""
        k_max = 3
        s = float(hi.max() - lo.min()) / (self.levels - 1) / (1 << k_max)
        errs = []
        for a in range(k_max + 1):
            self.set_params(s, torch.full_like(half, a, dtype=torch.int32), lo, hi)
            errs.append(((self.fake_quant(x2) - x2) ** 2).sum(0))
        exp = torch.stack(errs).argmin(0).to(torch.int32)
        self.set_params(s, exp, lo, hi)

    def describe(self) -> dict:
        d = super().describe()
        d.update(scale=float(self.scale), rule=self.rule,
                 exponents=sorted({int(e) for e in self.exponent.tolist()}),
                 outlier_channels=self.outlier_channels)
        return d


class Log2Quantizer(Quantizer):
    """FQ-ViT's log2 quantizer for post-Softmax values in [0, 1]: x̂ = 2^(−q), q ∈ [0, 2^b − 2];
    the top code stands for 0. The integer operand of A·V is then a shift: ``1 << (Q − q)`` under
    the step 2^(−Q), Q = 2^b − 2 (only the top few codes matter at ≥ 4 bits, so Q is capped)."""

    scheme = "log2"

    def __init__(self, bits: int, max_exponent: int = 30) -> None:
        self.max_exponent = max_exponent
        super().__init__(bits)

    def set_bits(self, bits: int) -> None:
        super().set_bits(bits)
        # Integer operand range limited to 30 bits so the shift fits int32 (16 in the integer
        # setting, whose Softmax has a 2^-16 step: a smaller value is 0 there already, and A·V's
        # products must fit int32); smaller values -> 0.
        self.exp_max = min(self.levels - 2, self.max_exponent)

    def codes(self, x: Tensor) -> Tensor:
        q = torch.round(-torch.log2(x.clamp_min(2.0 ** (-self.exp_max - 1))))
        q = torch.where(q > self.exp_max, torch.full_like(q, self.levels - 1), q.clamp_min(0))
        return q.to(torch.int32)

    def integer(self, codes: Tensor) -> Tensor:
        zero = codes >= self.levels - 1
        shifted = torch.ones_like(codes) << (self.exp_max - codes.clamp_max(self.exp_max))
        return torch.where(zero, torch.zeros_like(codes), shifted)

    def step(self, x: Tensor) -> Tensor:
        return torch.tensor(2.0 ** (-self.exp_max), dtype=x.dtype, device=x.device)

    def calibrate(self, x: Tensor, loss: LossFn, points: int = 50) -> None:
        self.calibrated.fill_(True)  # parameter-free
