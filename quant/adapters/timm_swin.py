"""timm Swin Transformer family (swin_*)."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn

from ..factory import QuantizerFactory
from ..modules import QWindowAttention
from .base import ModelAdapter, class_architecture, rewrite_transformer, timm_model_name


class TimmSwinAdapter(ModelAdapter):
    family = "timm_swin"
    timm_class = SwinTransformer

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def rewrite(self, model: nn.Module, factory: QuantizerFactory) -> nn.Module:
        return rewrite_transformer(model, factory, {WindowAttention: QWindowAttention})

    def lower(self, model: nn.Module):
        from ..integer.lower_swin import lower_swin

        return lower_swin(model)

    def architecture(self, model: nn.Module) -> dict:
        pe = model.patch_embed
        blk = model.layers[0].blocks[0]
        kwargs = {
            "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
            "in_chans": pe.proj.in_channels, "num_classes": model.num_classes,
            "embed_dim": model.embed_dim,
            "depths": [len(s.blocks) for s in model.layers],
            "num_heads": [s.blocks[0].attn.num_heads for s in model.layers],
            "window_size": list(blk.window_size),
            "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
            "global_pool": model.global_pool,
        }
        name = timm_model_name(model)
        if name:
            return {"family": self.family, "name": name, "kwargs": kwargs}
        # Built from its class: per-stage values, and what a registered name would have decided.
        firsts = [s.blocks[0] for s in model.layers]
        # The windows asked for, before each stage clamps its own to its resolution.
        windows = [list(w) for w in getattr(model, "_ref_window_sizes", [blk.window_size])]
        ratios = [getattr(b, "mlp_ratio", b.mlp.fc1.out_features / b.dim) for b in firsts]
        return class_architecture(self, model, {
            **kwargs,
            "window_size": windows[0] if all(w == windows[0] for w in windows) else windows,
            "mlp_ratio": ratios[0] if len(set(ratios)) == 1 else ratios,
            "head_dim": [b.attn.qkv.out_features // 3 // b.attn.num_heads for b in firsts],
            "qkv_bias": blk.attn.qkv.bias is not None,
            "always_partition": bool(getattr(blk, "always_partition", False)),
            "strict_img_size": bool(getattr(pe, "strict_img_size", True)),
        })
