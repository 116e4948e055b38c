"""timm Swin Transformer family (swin_*)."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn

from ..factory import QuantizerFactory
from ..modules import QWindowAttention
from .base import ModelAdapter, rewrite_transformer, timm_architecture_name


class TimmSwinAdapter(ModelAdapter):
    family = "timm_swin"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def rewrite(self, model: nn.Module, factory: QuantizerFactory) -> nn.Module:
        return rewrite_transformer(model, factory, {WindowAttention: QWindowAttention})

    def architecture(self, model: nn.Module) -> dict:
        pe = model.patch_embed
        blk = model.layers[0].blocks[0]
        return {"family": self.family, "name": timm_architecture_name(model), "kwargs": {
            "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
            "in_chans": pe.proj.in_channels, "num_classes": model.num_classes,
            "embed_dim": model.embed_dim,
            "depths": [len(s.blocks) for s in model.layers],
            "num_heads": [s.blocks[0].attn.num_heads for s in model.layers],
            "window_size": list(blk.window_size),
            "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
            "global_pool": model.global_pool,
        }}
