"""Which quantizer each kind of tensor gets, for a given ``QuantConfig``."""

from __future__ import annotations

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

    def weight(self, out_channels: int) -> UniformQuantizer:
        q = UniformQuantizer(self.config.w_bits, symmetric=True, axis=0, channels=out_channels)
        return self._tag(q, "weight")

    def embedding(self, channels: int) -> UniformQuantizer:
        """Position embeddings and class tokens: parameters the first LayerNorm consumes. 8 bits
        at every width, as biases stay 32-bit: they are a negligible share of the model."""
        q = UniformQuantizer(8, symmetric=True, axis=-1, channels=channels)
        return self._tag(q, "embedding")

    def activation(self, kind: str, channels: int | None = None) -> Quantizer:
        cfg, method, bits = self.config, self.config.method, self.config.a_bits
        q: Quantizer
        if kind == "image":
            q = UniformQuantizer(cfg.image_bits)
        elif kind == "post_softmax" and method in ("tsptq", "twin"):
            q = TwoScaleValueQuantizer(bits, region_rule="value", signed=False)
        elif kind == "post_softmax" and method == "ptf":
            q = Log2Quantizer(bits)
        elif kind == "post_gelu" and method == "tsptq":
            q = TwoScaleValueQuantizer(bits, region_rule="value", signed=True)
        elif kind == "post_gelu" and method == "twin":
            q = TwoScaleValueQuantizer(bits, region_rule="sign", signed=True)
        elif kind == "ln_input" and method in ("tsptq", "ptf"):
            if channels is None:
                raise ValueError("a LayerNorm-input quantizer needs the channel count")
            rule = "o2sf" if method == "tsptq" else "ptf"
            q = ChannelPow2Quantizer(bits, channels, rule=rule, outlier_rule=cfg.outlier_rule,
                                     shared_zero=method == "ptf")
        else:
            q = UniformQuantizer(bits)
        return self._tag(q, kind)
