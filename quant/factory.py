"""Which quantizer each kind of tensor gets, for a given ``QuantConfig``."""

from __future__ import annotations

from torch import nn

from .config import QuantConfig
from .quantizers import (
    ChannelPow2Quantizer,
    Log2Quantizer,
    Quantizer,
    TwoScaleValueQuantizer,
    UniformQuantizer,
)


class QuantizerFactory:
    """Builds quantizers by tensor kind; adapters call it while rewriting a model."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def _tag(self, q: Quantizer, kind: str) -> Quantizer:
        q.kind = kind
        q.enabled = self.config.enabled(kind)
        return q

    def bits_for(self, kind: str) -> int:
        """The bit width a kind gets before per-quantizer overrides."""
        if kind == "weight":
            return self.config.w_bits
        if kind == "embedding":
            return 8
        return self.config.image_bits if kind == "image" else self.config.a_bits

    def weight(self, out_channels: int) -> UniformQuantizer:
        q = UniformQuantizer(self.bits_for("weight"), symmetric=True, axis=0,
                             channels=out_channels)
        return self._tag(q, "weight")

    def embedding(self, channels: int, axis: int = -1) -> UniformQuantizer:
        """Position embeddings and class tokens: parameters the first LayerNorm consumes. 8 bits
        at every width, as biases stay 32-bit: they are a negligible share of the model.
        ``axis=0`` gives a lookup table (a text encoder's token embeddings) one scale per row."""
        q = UniformQuantizer(self.bits_for("embedding"), symmetric=True, axis=axis,
                             channels=channels)
        return self._tag(q, "embedding")

    def activation(self, kind: str, channels: int | None = None,
                   post_ln: bool = False) -> Quantizer:
        """``post_ln``: the tensor is a LayerNorm's output (the input of qkv or fc1)."""
        cfg, method, bits = self.config, self.config.method, self.bits_for(kind)
        q: Quantizer
        if kind == "image":
            q = UniformQuantizer(bits)
        elif kind == "post_softmax" and method in ("tsptq", "twin"):
            q = TwoScaleValueQuantizer(bits, region_rule="value", signed=False,
                                       coarse_offset=method == "tsptq" and cfg.coarse_offset)
        elif kind == "post_softmax" and method == "ptf":
            q = Log2Quantizer(bits, 16 if cfg.setting == "integer" else 30)
        elif kind == "post_gelu" and method == "tsptq":
            q = TwoScaleValueQuantizer(bits, region_rule="value", signed=True,
                                       coarse_offset=cfg.coarse_offset,
                                       aligned_zero=cfg.aligned_gelu_zero)
        elif kind == "post_gelu" and method == "twin":
            q = TwoScaleValueQuantizer(bits, region_rule="sign", signed=True)
        elif (kind == "linear_input" and post_ln and method == "tsptq"
              and cfg.post_ln_two_scale and channels is not None):
            # Beyond the paper (METHOD.md section 1): O-2SF on post-LayerNorm activations too.
            # The integer matmul absorbs each channel's 2^e by shifting that weight column.
            q = ChannelPow2Quantizer(bits, channels, rule="o2sf", outlier_rule=cfg.outlier_rule,
                                     keep_bulk=bool(cfg.keep_bulk))
        elif kind == "ln_input" and method in ("tsptq", "ptf"):
            if channels is None:
                raise ValueError("a LayerNorm-input quantizer needs the channel count")
            rule = "o2sf" if method == "tsptq" else "ptf"
            shared = (method == "ptf" if cfg.channel_zero_points is None
                      else not cfg.channel_zero_points)
            q = ChannelPow2Quantizer(bits, channels, rule=rule, outlier_rule=cfg.outlier_rule,
                                     shared_zero=shared, keep_bulk=bool(cfg.keep_bulk))
        else:
            q = UniformQuantizer(bits)
        return self._tag(q, kind)


def apply_overrides(model: nn.Module, config: QuantConfig) -> None:
    """Set per-quantizer bit widths and pinned search parameters named in ``config``."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}
    unknown = sorted((set(config.bit_overrides) | set(config.pinned)) - set(quantizers))
    if unknown:
        example = next(iter(quantizers), "")
        raise ValueError(f"no quantizer named {unknown[:3]} in this model "
                         f"(names look like {example!r})")
    for name, bits in config.bit_overrides.items():
        quantizers[name].set_bits(bits)
    for name, params in config.pinned.items():
        quantizers[name].set_restrict(params)
