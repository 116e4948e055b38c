"""Quantized twins of the layers a vision transformer is made of.

Each module owns its quantizers and knows what consumes each quantized tensor, so it can score
calibration candidates on the consumer's output. Statistics are captured once, in one FP forward
pass (``Capture``), kept on the module, and reused by every later (re)calibration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantConfig
from .metrics import channel_output_loss, error_loss, linear_error, matmul_error, output_loss
from .quantizers import ChannelPow2Quantizer, Quantizer, UniformQuantizer
from .rounding import gptq_round, inverse_hessian_factor


class UnsupportedModelError(TypeError):
    """The model (or one of its layers) has no quantized twin."""


@dataclass
class Capture:
    """What to keep of the activations during the statistics pass."""

    rows: int = 2048
    # Per attention probability tensor (B·H·N·N) and per patch-embedding input: beyond it, rows
    # (query rows, patches) are sampled from every image (``QAttention._capture_attention``,
    # ``QConv2d._capture``).
    elements: int = 1 << 21
    # What a sampled attention tensor keeps: every candidate of Q, K, V and A costs a matmul
    # over the kept query rows, so this bounds those searches' cost (``_capture_attention``).
    attention_sample: int = 1 << 20
    grads: bool = False
    # Also sum xᵀx over every real input row of each weighted layer (GPTQ's Hessian).
    input_hessian: bool = False
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    # (N, L) real tokens of a padded text batch: padding enters no statistic. None for images.
    token_mask: Tensor | None = None

    def real_rows(self, x: Tensor, start: int = 0) -> Tensor | None:
        """Indices of the real-token rows of ``x`` (N, L, ..., C) flattened to rows, or None when
        every row is real (images, or a tensor that is not per token). ``start``: ``x`` holds the
        positions from ``start`` on (the first-token split)."""
        m = self.token_mask
        m = None if m is None else m[:, start:]
        if m is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(m.shape) or bool(m.all()):
            return None
        rows = m.reshape(m.shape + (1,) * (x.dim() - 3)).expand(x.shape[:-1])
        return torch.nonzero(rows.reshape(-1).to(x.device)).flatten()

    def keep_tokens(self, t: Tensor) -> Tensor:
        """Zero the padding positions of an attention tensor (N, H, L, ·), so they add nothing to
        a calibration loss and leave every range alone (zero quantizes to zero exactly)."""
        m = self.token_mask
        if m is None or t.dim() != 4 or t.shape[0] != m.shape[0] or t.shape[2] != m.shape[1]:
            return t
        return t * m[:, None, :, None].to(t.device, t.dtype)


def capture_rows(x: Tensor, capture: Capture,
                 start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x`` as rows of its last axis: (all rows, the sampled rows' indices, and every
    channel's min and max over the real rows). Padding tokens are neither sampled nor counted
    in the per-channel ranges. The sample is ``capture.rows`` random rows plus the rows of the
    tensor's own min and max: a per-tensor quantizer's range is the whole tensor's, a
    per-channel one gets ``lo`` and ``hi``, and a candidate's loss is a mean over uniformly
    drawn rows. Each channel's extreme rows, kept too before, added 925 rows to fc2's 2,048 on
    deit_tiny (768 channels), all of them scored by every candidate, and weighted the loss
    towards outliers (BENCHMARKS.md, "Third round")."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    real = capture.real_rows(x, start)
    pool = x2 if real is None else x2[real]
    lo, hi = pool.amin(0), pool.amax(0)
    idx = sample_rows(pool, capture.rows, capture.generator, per_channel=False)
    return x2, idx if real is None else real[idx], lo, hi


def pick_per_image(scores: Tensor, forced: list[Tensor], count: int,
                   padding: Tensor | None = None) -> Tensor:
    """Indices (…, ``count``) along the last axis of ``scores`` (…, n), ascending: the
    ``forced`` positions (…) first, then real positions in the order of ``scores`` (uniform
    random draws), then ``padding`` (…, n) positions last."""
    scores = scores.clone()
    if padding is not None:
        scores = scores + 2 * padding.to(scores.dtype)
    for i, f in enumerate(forced):
        scores.scatter_(-1, f.unsqueeze(-1), float(i - len(forced)))
    return scores.topk(count, dim=-1, largest=False).indices.sort(dim=-1).values


def sample_rows(x2: Tensor, rows: int, gen: torch.Generator, lo: Tensor | None = None,
                hi: Tensor | None = None, per_channel: bool = True) -> Tensor:
    """Random rows plus the rows that hold each channel's min and max (``lo``, ``hi`` when
    known), so that a sampled tensor still shows the full range of every channel (outlier
    channels live in few tokens). ``per_channel=False``: only the rows of the tensor's own
    min and max, for a sample whose per-channel ranges travel beside it. The random rows come
    first, in their random order, so that any prefix of the sample is a uniform draw over every
    image (the weight search takes one: ``QLinear._weight_sample``); sorted, a prefix held the
    first images only (512 rows of a 2,048-row sample: 8 of deit_tiny's 32)."""
    n = x2.shape[0]
    if n <= rows:
        return torch.arange(n, device=x2.device)
    if per_channel:
        lo = x2.amin(0) if lo is None else lo
        hi = x2.amax(0) if hi is None else hi
        extreme = torch.cat([first_row_of(x2, hi, True), first_row_of(x2, lo, False)])
    else:
        extreme = torch.stack([x2.argmax(), x2.argmin()]) // x2.shape[1]
    rand = torch.randperm(n, generator=gen)[:rows].to(x2.device)
    extreme = extreme.unique()
    return torch.cat([rand, extreme[~torch.isin(extreme, rand)]])


def first_row_of(x2: Tensor, value: Tensor, largest: bool) -> Tensor:
    """Per channel, the first row of ``x2`` holding ``value``, its max (or min):
    ``argmax(0)``'s answer (``argmin(0)``'s), at a fraction of its cost on one thread (a
    strided reduction there; here one comparison finds the few rows holding an extreme, then
    those are searched). The hits are 0/1 in x2's dtype: comparisons into bool and
    reductions of bool run scalar loops on some CPU builds (AVX2: 15 ms → 10 ms per call on
    fc2's 6304 × 768 inputs)."""
    hit = torch.eq(x2, value, out=torch.empty_like(x2))
    rows = torch.nonzero(hit.amax(1)).flatten()
    found = hit[rows]
    if len(rows) == 0 or not bool(found.amax(0).min() > 0):  # a NaN equals nothing
        return x2.argmax(0) if largest else x2.argmin(0)
    return rows[found.argmax(0)]  # the first of the hits


class QuantModule(nn.Module, ABC):
    """Base of every quantized layer."""

    def __init__(self) -> None:
        super().__init__()
        self.capture: Capture | None = None
        self.stats: dict[str, Tensor] = {}
        # A second quantizer for the input's first token (see ``first_token_input``), or None.
        self.first_q: Quantizer | None = None

    def local_quantizers(self) -> dict[str, Quantizer]:
        """This module's own quantizers (not its children's), by attribute name."""
        return {n: m for n, m in self.named_children() if isinstance(m, Quantizer)}

    @abstractmethod
    def calibrate(self, config: QuantConfig) -> None:
        """Search this module's quantizers on its captured statistics."""

    def release(self) -> None:
        self.stats = {}

    def calibration_extras(self) -> dict[str, Tensor]:
        """What a calibration changed beside the quantizers' buffers (a rounded weight), for
        ``Calibrator`` to remember and restore with them."""
        return {}

    def restore_calibration_extras(self, extras: dict[str, Tensor]) -> None:
        """Put back what ``calibration_extras`` returned."""

    def _split_first(self, x: Tensor) -> bool:
        return self.first_q is not None and x.dim() == 3 and x.shape[1] > 1

    def _quantize_input(self, x: Tensor) -> Tensor:
        """``input_q(x)``; with a first-token quantizer, token 0 of each sequence takes
        ``first_q`` and the others ``input_q``."""
        if not self._split_first(x):
            return self.input_q(x)
        return torch.cat([self.first_q(x[:, :1]), self.input_q(x[:, 1:])], dim=1)

    def _capture_input(self, x: Tensor, out: Tensor, out_channels: int) -> None:
        """Keep a row sample of ``x`` and every channel's range over the real tokens, and
        register for the same rows of the output's gradient. With a first-token quantizer,
        token 0 is kept apart (all of its rows) and left out of the others' statistics."""
        start = 1 if self._split_first(x) else 0
        x2, idx, lo, hi = capture_rows(x[:, start:] if start else x, self.capture, start)
        self.stats.update(x=x2[idx], lo=lo, hi=hi)
        if start:  # token 0 of every text that has one (a left-padded text would not)
            m = self.capture.token_mask
            keep = slice(None) if m is None else m[:, 0].to(x.device)
            self.stats["x_first"] = x[:, 0].detach()[keep]
            self._grad_hook(out, "g_first", lambda g: g[:, 0][keep])
        self._grad_hook(out, "g", lambda g: (g[:, start:] if start else g).reshape(
            -1, out_channels)[idx])
        src = self.__dict__.get("gelu_source")
        h = None if src is None else src.__dict__.pop("last_out", None)
        if h is not None and h.shape == x.shape:  # the GELU's input, for its integer kernel
            self.stats["h"] = (h[:, start:] if start else h).reshape(-1, h.shape[-1])[idx]
            if start:
                self.stats["h_first"] = h[:, 0][keep]

    def _calibrate_input(self, make_loss, config: QuantConfig,
                         kernel: dict[str, Tensor] | None = None) -> None:
        """Search the input quantizer on the captured rows under ``make_loss(x, g, q)``
        (``q``: the quantizer searched; ``x`` the FP rows, the reference). ``kernel``: per
        stats key, what an integer kernel makes of those rows (the integer setting): the
        candidates quantize that instead, so the scales fit what runs;
        per-channel quantizers also get each channel's min and max over *all* calibration
        tokens. A first-token quantizer is searched the same way on token 0's rows, with
        channel ranges over every token: 32 [CLS] rows alone give some channels a range far
        narrower than what a new text's [CLS] brings (measured: MiniLM's KL to FP32 0.005 -> 2)."""
        pairs = [(self.input_q, "x", "g")]
        if self.first_q is not None and len(self.stats.get("x_first", ())):
            pairs.append((self.first_q, "x_first", "g_first"))
        for q, xk, gk in pairs:
            if not _enabled(q):
                continue
            x = self.stats[xk]
            per_channel = {}
            if isinstance(q, ChannelPow2Quantizer):
                lo, hi = self.stats["lo"], self.stats["hi"]
                if xk == "x_first":
                    lo, hi = torch.minimum(lo, x.amin(0)), torch.maximum(hi, x.amax(0))
                per_channel = {"lo": lo, "hi": hi}
            xin = (kernel or {}).get(xk, x)
            q.calibrate(xin, make_loss(x, self.stats.get(gk), q), config.search_points,
                        **per_channel)

    def _grad_hook(self, out: Tensor, key: str, index) -> None:
        if self.capture is None or not self.capture.grads or not out.requires_grad:
            return

        def hook(g: Tensor) -> None:
            self.stats[key] = index(g.detach())

        out.register_hook(hook)


def first_token_input(module: QuantModule, first_q: Quantizer) -> QuantModule:
    """Give ``module`` a second input quantizer for token 0 of every sequence, a departure from
    the paper for encoders whose token 0 is a fixed special token. BERT's [CLS] carries
    "massive activations" (Sun et al., 2024): in MiniLM its channel 99 reaches ~120 where every
    other token stays within a few units, so one set of scales must either clip it or coarsen
    that channel for every token. Token 0 is a fixed position, so integer hardware gives it its
    own static constants (scale, exponents, zero points) and nothing else changes: a LayerNorm
    is invariant to a per-token scale, and a matmul applies one per output row."""
    module.first_q = first_q
    return module


def gelu_pair(fc1: QuantModule, fc2: QuantModule) -> None:
    """Mark ``fc1``'s output as the GELU input whose output ``fc2`` reads: the statistics pass
    then keeps the GELU's input rows beside fc2's, so that the integer setting scores fc2's
    input quantizer through the integer GELU. Plain attributes, not submodules: no cycle."""
    fc1.__dict__["feeds_gelu"] = True
    fc2.__dict__["gelu_source"] = fc1


def _integer(config: QuantConfig) -> bool:
    return config.setting == "integer"


def _enabled(q: Quantizer) -> bool:
    return q.enabled


class QWeighted(QuantModule):
    """A layer with a weight: per-output-channel symmetric weight quantizer, input quantizer.

    Weights are searched first (per channel, on the output error they cause alone), then the
    input quantizer against the FP output with the quantized weights in place.
    """

    input_q: Quantizer
    weight_q: UniformQuantizer

    @abstractmethod
    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The layer's computation with the given (possibly quantized) weight."""

    @abstractmethod
    def _capture(self, x: Tensor, out: Tensor) -> None:
        """Keep a sample of ``x`` and register for the same sample of the output's grad."""

    def _weight_sample(self, x: Tensor) -> Tensor:
        return x

    def _input_loss(self, metric: str, xs: Tensor, gs: Tensor | None, w: Tensor, w_hat: Tensor,
                    b: Tensor | None):
        """The input candidates' loss: the layer's output with ``w_hat`` against the FP one."""
        return output_loss(metric, lambda xq: self._op(xq, w_hat, b), self._op(xs, w, b), gs)

    def _weight_columns(self, x: Tensor) -> Tensor:
        """``x`` as the rows the weight's flattened columns multiply: (rows, weight[0].numel())."""
        return x.reshape(-1, x.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        out = self._op(self._quantize_input(x), self.weight_q(self.weight), self.bias)
        if self.capture is not None:
            self._capture(x, out)
            if self.capture.input_hessian:
                self._gather_hessian(x)
        return out

    def _gather_hessian(self, x: Tensor) -> None:
        """Add xᵀx of the real rows of ``x`` to ``stats["xtx"]`` and keep the FP weight: a
        calibration rounds a copy of it into ``self.weight``, and the next one starts again
        from the FP weight."""
        real = self.capture.real_rows(x)
        cols = self._weight_columns(x.detach())
        cols = cols if real is None else cols[real]
        xtx = cols.t().float() @ cols.float()
        self.stats["xtx"] = xtx + self.stats["xtx"] if "xtx" in self.stats else xtx
        self.stats.setdefault("w", self.weight.detach().clone())

    def calibration_extras(self) -> dict[str, Tensor]:
        if "w" not in self.stats or not self.weight_q.calibrated:
            return {}
        return {"weight_codes": self.weight_q.codes(self.weight.detach()).to(
            torch.uint8 if self.weight_q.bits <= 8 else torch.int32)}

    def restore_calibration_extras(self, extras: dict[str, Tensor]) -> None:
        with torch.no_grad():
            if "weight_codes" in extras:
                self.weight.copy_(self.weight_q.dequantize(extras["weight_codes"].int(),
                                                           self.weight))
            elif "w" in self.stats:
                self.weight.copy_(self.stats["w"])

    # Clipping fractions of each row's min-max range GPTQ rounds on, beside the grid the
    # nearest-rounding search chose: error compensation moves the best clipping, both ways
    # (above 1, fewer compensated weights are clamped). Chosen on validation data
    # (BENCHMARKS.md, "Weight rounding"): MiniLM W4 weights, 128 texts, val KL 0.047 with
    # 1.0..0.5, 0.044 with 1.2..0.5.
    GPTQ_ALPHAS = (1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5)

    def _gptq_weight(self, w: Tensor) -> Tensor:
        """``w`` rounded by GPTQ (``quant.rounding``) on each candidate grid; every output row
        keeps, among those and the nearest rounding on the searched grid, the one of lowest
        layer-output error over all calibration tokens, (w − ŵ) H (w − ŵ)ᵀ: GPTQ's own
        objective (the sampled rows of the search's metric over-rate a rounding fitted to
        exactly those tokens). The weight quantizer keeps that row's scale. All candidates
        are rounded in one pass (stacked rows)."""
        q = self.weight_q
        h = self.stats["xtx"]
        w2 = w.reshape(len(w), -1)
        lo, hi = w2.amin(1), w2.amax(1)
        searched = q.scale.clone()
        scales = [searched]
        for a in () if "alpha" in q.restrict else self.GPTQ_ALPHAS:  # a pinned clipping stays
            q.set_from_range(lo, hi, a)
            scales.append(q.scale.clone())
        s = torch.cat(scales)
        z = q.zero_point.repeat(len(scales))
        rounded = gptq_round(w2.repeat(len(scales), 1), inverse_hessian_factor(h), s, z,
                             q.bits).reshape(len(scales), *w2.shape)
        q.scale = searched
        nearest = q.fake_quant(w).reshape(w2.shape)

        def loss(wq: Tensor) -> Tensor:
            d = wq - w2
            return ((d @ h) * d).sum(1)

        best, best_err, best_s = nearest, loss(nearest), searched
        for wr, sc in zip(rounded, scales, strict=True):
            err = loss(wr)
            better = err < best_err
            best = torch.where(better[:, None], wr, best)
            best_s = torch.where(better, sc, best_s)
            best_err = torch.minimum(err, best_err)
        q.scale = best_s
        return best.reshape(w.shape)

    def calibrate(self, config: QuantConfig) -> None:
        x, g = self.stats["x"], self.stats.get("g")
        fp = self.stats.get("w")
        if fp is not None:  # a rounded weight from an earlier calibration: start from FP
            self.weight.data.copy_(fp)
        w = fp if fp is not None else self.weight.detach()  # the FP weight, never written
        b = None if self.bias is None else self.bias.detach()
        if _enabled(self.weight_q):
            xw = self._weight_sample(x)
            gw = None if g is None else g[: len(xw)]
            first, g_first = self.stats.get("x_first"), self.stats.get("g_first")
            if first is not None and (gw is None) == (g_first is None):
                xw = torch.cat([first, xw])  # token 0 is computed with the same weights
                gw = None if gw is None else torch.cat([g_first, gw])
            loss = channel_output_loss(config.metric, lambda wq: self._op(xw, wq - w, None), gw)
            self.weight_q.calibrate(w, None, config.search_points, channel_loss=loss)
            if config.weight_rounding == "gptq" and "xtx" in self.stats:
                self.weight.data.copy_(self._gptq_weight(w))
        w_hat = self.weight_q(self.weight.detach())
        kernel = None
        if _integer(config) and "h" in self.stats:
            from .integer import simulate

            kernel = {"x": simulate.gelu(self.stats["h"])}
            if "h_first" in self.stats:
                kernel["x_first"] = simulate.gelu(self.stats["h_first"])
        self._calibrate_input(
            lambda xs, gs, _q: self._input_loss(config.metric, xs, gs, w, w_hat, b), config,
            kernel)


class QLinear(QWeighted):
    """Linear: activations sampled by rows (tokens)."""

    def __init__(self, linear: nn.Linear, input_q: Quantizer, weight_q: UniformQuantizer) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_q = input_q
        self.weight_q = weight_q

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def _capture(self, x: Tensor, out: Tensor) -> None:
        self._capture_input(x, out, self.out_features)
        if self.__dict__.get("feeds_gelu"):
            self.__dict__["last_out"] = out.detach()

    def _weight_sample(self, x: Tensor) -> Tensor:
        # the weight search is per channel and needs fewer rows: a prefix of the sample, a
        # uniform draw over every image where the input was sampled (``sample_rows``)
        return x[:512]

    def _input_loss(self, metric: str, xs: Tensor, gs: Tensor | None, w: Tensor, w_hat: Tensor,
                    b: Tensor | None):
        if metric == "cosine":
            return super()._input_loss(metric, xs, gs, w, w_hat, b)
        # the bias is on both sides of the error: x̂·Ŵᵀ − x·Wᵀ, one addmm per candidate
        return error_loss(metric, linear_error(w_hat, F.linear(xs, w)), gs)


class QConv2d(QWeighted):
    """The patch-embedding convolution: activations sampled by patches of every image."""

    def __init__(self, conv: nn.Conv2d, input_q: Quantizer, weight_q: UniformQuantizer) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise UnsupportedModelError("only plain (groups=1, zero-padded) convolutions")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_q = input_q
        self.weight_q = weight_q

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def _weight_columns(self, x: Tensor) -> Tensor:
        cols = F.unfold(x, tuple(self.weight.shape[2:]), dilation=self.dilation,
                        padding=self.padding, stride=self.stride)  # (N, C·kh·kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def _patchwise(self) -> bool:
        """Stride = kernel, no padding, no dilation (ViT, DeiT and Swin patch embeddings): every
        output pixel reads one patch of its own, so patches can be sampled independently."""
        return (tuple(self.stride) == tuple(self.weight.shape[2:])
                and tuple(self.dilation) == (1, 1)
                and self.padding in ((0, 0), "valid"))

    def _capture(self, x: Tensor, out: Tensor) -> None:
        """The whole input while it fits ``Capture.elements``. Beyond it, a patch embedding
        keeps p patches of every image (p = elements // (B·patch)): random ones from the seeded
        generator plus the patches holding the image's min and max, so the sample keeps the
        input's full range. An image's patches are laid side by side as one strip (B, C, kh,
        p·kw): the convolution of the strip gives exactly those patches' outputs, in the same
        (B, O, 1, p) layout as the gradient kept for them, and an image still forms rows of
        outputs. Every image contributes, where keeping whole images left most out (13 of 32
        on ViT-B at 224). Other convolutions read overlapping or padded windows, whose outputs
        a batch of patches does not reproduce: they keep the first whole images."""
        x = x.detach()
        cap = self.capture
        if len(x) * x[0].numel() <= cap.elements or not self._patchwise():
            n = max(1, min(len(x), cap.elements // max(1, x[0].numel())))
            self.stats["x"] = x[:n]
            self._grad_hook(out, "g", lambda g: g[:n])
            return
        (b, c), (kh, kw), (hp, wp) = x.shape[:2], self.weight.shape[2:], out.shape[2:]
        patches = x[:, :, :hp * kh, :wp * kw].reshape(b, c, hp, kh, wp, kw).permute(
            0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c, kh, kw)
        p = max(1, min(hp * wp, cap.elements // (b * c * kh * kw)))
        flat = patches.reshape(b, hp * wp, -1)
        scores = torch.rand(b, hp * wp, generator=cap.generator).to(x.device)
        idx = pick_per_image(scores, [flat.amax(-1).argmax(-1), flat.amin(-1).argmin(-1)], p)
        picked = patches[torch.arange(b, device=x.device)[:, None], idx]  # (B, p, C, kh, kw)
        self.stats["x"] = picked.permute(0, 2, 3, 1, 4).reshape(b, c, kh, p * kw)

        def strip(g: Tensor) -> Tensor:
            g = g.flatten(2).gather(2, idx[:, None, :].expand(-1, g.shape[1], -1))
            return g.unsqueeze(2)  # (B, O, 1, p)

        self._grad_hook(out, "g", strip)


class QLayerNorm(QuantModule):
    """LayerNorm whose input (the residual stream) is quantized: O-2SF under TSPTQ."""

    def __init__(self, norm: nn.LayerNorm, input_q: Quantizer) -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.input_q = input_q

    def _norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self._norm(self._quantize_input(x))
        if self.capture is not None:
            self._capture_input(x, out, x.shape[-1])
        return out

    def calibrate(self, config: QuantConfig) -> None:
        with torch.no_grad():
            w = None if self.weight is None else self.weight.detach()
            b = None if self.bias is None else self.bias.detach()

            def consumer(xq: Tensor) -> Tensor:
                return F.layer_norm(xq, self.normalized_shape, w, b, self.eps)

            def make_loss(xs: Tensor, gs: Tensor | None, q: Quantizer):
                if not _integer(config):
                    return output_loss(config.metric, consumer, consumer(xs), gs)
                from .integer import simulate

                # the integer LayerNorm on the candidate's integers (its step: the candidate's)
                return output_loss(config.metric, lambda xq: simulate.layernorm(
                    xq, float(q.scale), w, b, self.eps), consumer(xs), gs)

            self._calibrate_input(make_loss, config)


class QAttention(QuantModule):
    """Multi-head self-attention with both matmuls quantized (timm ``Attention``).

    Softmax consumes the int32 accumulator of Q·Kᵀ (I-BERT style), so it needs no quantizer of
    its own; its output, the A operand of A·V, is quantized (V-2SF under TSPTQ).
    """

    def __init__(self, attn: nn.Module, qkv: QLinear, proj: QLinear,
                 q_q: Quantizer, k_q: Quantizer, v_q: Quantizer, a_q: Quantizer) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv, self.proj = qkv, proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.q_q, self.k_q, self.v_q, self.a_q = q_q, k_q, v_q, a_q

    def _logit_bias(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return logits
        if mask.dtype == torch.bool:
            return logits.masked_fill(~mask, float("-inf"))
        return logits + mask

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if is_causal:
            raise UnsupportedModelError("causal attention is not supported")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = self._attend(q * self.scale, k, v, attn_mask if attn_mask is not None else mask)
        return self.proj_drop(self.proj(out))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Both quantized matmuls on (B, H, N, D) operands, ``q`` already scaled; returns the
        heads concatenated, (B, N, H·D)."""
        b, _, n, _ = q.shape
        logits = self.q_q(q) @ self.k_q(k).transpose(-2, -1)
        logits = self._logit_bias(logits, mask)
        a = self.attn_drop(logits.softmax(dim=-1))
        out = self.a_q(a) @ self.v_q(v)
        if self.capture is not None:
            self._capture_attention(q, k, v, a, logits, out)
        return out.transpose(1, 2).reshape(b, n, -1)

    def _capture_attention(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, logits: Tensor,
                           out: Tensor) -> None:
        """Keep Q, K, V and A of every image (padding queries and keys zeroed: they count for
        nothing). K and V stay whole (B·H·N·D, the size of the qkv output): a query's logits
        and its output read every key. Where A (B·H·N·N) is over ``Capture.elements``, each
        image and head keeps r = attention_sample // (B·H·N) query rows of Q and A, and of the
        gradients at the logits and at the output: random real rows from the seeded generator,
        plus the rows holding Q's min and max and A's max, so that the sampled tensors keep
        their full range, and token 0 (the class token: in a classifier's last block the only
        row with a gradient, the only one the Hessian metric weighs). The same rows
        everywhere, so Q_s·Kᵀ and A_s·V are exactly those rows of the full products, and the
        row-wise (integer) Softmax sees whole rows. Every calibration loss is a mean over
        rows, which a random row sample of every image estimates (the forced rows aside); the first
        images alone (4 of 32 on ViT-B at 224) left the rest of the calibration set out.
        A sample keeps 2^20 values of A (``Capture.attention_sample``; deit_tiny at 224: 55
        of 197 query rows of every image and head, 5,280 rows in all), half the cap under
        which a tensor stays whole: each of a block's ~50 candidates costs a matmul over
        these rows, and on deit_tiny the 2^20 sample picks the same quantizers as 2^21 did
        (BENCHMARKS.md, "Third round")."""
        keep = self.capture.keep_tokens
        q, k, v, a = (keep(t.detach()) for t in (q, k, v, a))
        b, h, n, _ = a.shape
        r = min(n, self.capture.attention_sample // max(1, b * h * n))
        if b * h * n * n <= self.capture.elements or r >= n:
            self.stats.update(q=q, k=k, v=v, a=a)
            self._grad_hook(logits, "g_logits", lambda g: g)
            self._grad_hook(out, "g_out", lambda g: g)
            return
        mask = self.capture.token_mask
        padding = None
        if mask is not None and tuple(mask.shape) == (b, n):
            padding = ~mask.to(a.device, torch.bool)[:, None, :].expand(b, h, n)
        first = torch.zeros(b, h, dtype=torch.long, device=a.device)
        forced = [first, q.amax(-1).argmax(-1), q.amin(-1).argmin(-1), a.amax(-1).argmax(-1)]
        scores = torch.rand(b, h, n, generator=self.capture.generator).to(a.device)
        rows = pick_per_image(scores, forced, max(1, r), padding)
        # whole rows of the flattened (B·H·N, ·) tensors: ``index_select`` copies rows, where
        # ``gather`` along an expanded index reads element by element (3× slower)
        flat = (rows + torch.arange(b * h, device=a.device).view(b, h, 1) * n).reshape(-1)

        def pick(t: Tensor) -> Tensor:
            return t.reshape(b * h * n, -1).index_select(0, flat).view(*rows.shape, -1)

        self.stats.update(q=pick(q), k=k, v=v, a=pick(a))
        self._grad_hook(logits, "g_logits", pick)
        self._grad_hook(out, "g_out", pick)

    def calibrate(self, config: QuantConfig) -> None:
        s = self.stats
        q, k, v, a = s["q"], s["k"], s["v"], s["a"]
        metric, pts = config.metric, config.search_points
        with torch.no_grad():
            logits, out = q @ k.transpose(-2, -1), a @ v
            g_logits, g_out = s.get("g_logits"), s.get("g_out")
            kt = k.transpose(-2, -1)

            def loss(consumer, target, grad, **operands):
                if metric == "cosine":
                    return output_loss(metric, consumer, target, grad)
                # each candidate's error inside its matmul (``error_loss``)
                return error_loss(metric, matmul_error(target, **operands), grad)

            if _enabled(self.q_q):
                self.q_q.calibrate(q, loss(lambda t: t @ kt, logits, g_logits, right=kt), pts)
            if _enabled(self.k_q):
                self.k_q.calibrate(k, loss(lambda t: q @ t.transpose(-2, -1), logits, g_logits,
                                           left=q, transposed=True), pts)
            if _enabled(self.a_q):
                a_in = self._kernel_softmax(q, k, a) if _integer(config) else a
                self.a_q.calibrate(a_in, loss(lambda t: t @ v, out, g_out, right=v), pts)
            if _enabled(self.v_q):
                self.v_q.calibrate(v, loss(lambda t: a @ t, out, g_out, left=a), pts)

    def _kernel_softmax(self, q: Tensor, k: Tensor, a: Tensor) -> Tensor:
        """What the integer Softmax makes of the calibration logits: Q·Kᵀ on the calibrated
        Q and K codes, plus whatever the model added before its Softmax (position bias,
        masks), recovered as log A − Q·Kᵀ (Softmax is shift-invariant per row; A = 0 is a
        masked position), on the integer logits' grid s_q·s_k."""
        from .integer import simulate

        keep = a > 0
        added = torch.where(keep, a.clamp_min(1e-30).log() - q @ k.transpose(-2, -1), 0)
        logits = self.q_q(q) @ self.k_q(k).transpose(-2, -1) + added
        step = float(self.q_q.step(q)) * float(self.k_q.step(k))
        return simulate.softmax(logits, step, keep)


class QWindowAttention(QAttention):
    """Swin's window attention: adds the relative position bias and the shift mask to Q·Kᵀ
    (both in the int32 accumulator domain, before Softmax)."""

    def __init__(self, attn: nn.Module, *args) -> None:
        super().__init__(attn, *args)
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index,
                             persistent=False)

    def _logit_bias(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1)
        logits = logits + bias.unsqueeze(0)
        if mask is not None:
            nw, n = mask.shape[0], logits.shape[-1]
            logits = logits.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            logits = logits.view(-1, self.num_heads, n, n)
        return logits


class QSelfAttention(QAttention):
    """Hugging Face BERT's ``BertSelfAttention``: it returns the heads before the output
    projection (``BertSelfOutput.dense``, rewritten as a plain Linear) and takes BERT's call
    signature. Its query, key and value Linears come fused into one ``qkv``, as in timm, so the
    LayerNorm output they share is quantized once; matmuls, quantizers and calibration are
    ``QAttention``'s."""

    def __init__(self, attn: nn.Module, qkv: QLinear, q_q: Quantizer, k_q: Quantizer,
                 v_q: Quantizer, a_q: Quantizer) -> None:
        QuantModule.__init__(self)  # QAttention's constructor reads timm's attribute names
        self.num_heads = attn.num_attention_heads
        self.scale = attn.scaling
        self.qkv = qkv
        self.attn_drop = attn.dropout
        self.q_q, self.k_q, self.v_q, self.a_q = q_q, k_q, v_q, a_q

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, cache=None,
                **kwargs) -> tuple[Tensor, None]:
        if encoder_hidden_states is not None or cache is not None:
            raise UnsupportedModelError("cross-attention and key/value caches are not supported")
        b, n, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self._attend(q * self.scale, k, v, attention_mask), None
