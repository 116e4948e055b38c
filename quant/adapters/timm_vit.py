"""timm VisionTransformer family: vit_*, deit_* (distilled included), any image and patch size."""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import Attention, LayerScale
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from ..calibrate import attach_param_quantizers
from ..factory import QuantizerFactory
from ..modules import QAttention, QuantModule, UnsupportedModelError
from ..reparam import reparameterize_post_ln
from .base import (
    ModelAdapter,
    class_architecture,
    mlp_ratio,
    rewrite_transformer,
    timm_model_name,
)


class TimmViTAdapter(ModelAdapter):
    family = "timm_vit"
    # Token 0 is the class token, where the model has one (checked in ``rewrite``); the option
    # stays off by default here (``first_token_scale``; why: QuantConfig.first_token_scale).
    fixed_first_token = True
    coarse_offset = True  # chosen on validation: see QuantConfig.coarse_offset
    # The partial setting (LayerNorm in float): O-2SF on the qkv and fc1 inputs and GPTQ, the
    # lowest validation KL at W6A6, W4A8 and W4A4, second at W8A8 (digits ViT; BENCHMARKS.md
    # "Partial setting").
    setting_choices = {"partial": {"post_ln_two_scale": True, "weight_rounding": "gptq"}}
    timm_class = VisionTransformer

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def rewrite(self, model: nn.Module, factory: QuantizerFactory) -> nn.Module:
        for blk in model.blocks:
            if type(blk) not in (Block, ResPostBlock):
                raise UnsupportedModelError(f"ViT block {type(blk).__name__} is not supported")
        if getattr(model, "attn_pool", None) is not None:
            raise UnsupportedModelError("attention-pool (MAP) heads are not supported")
        if factory.config.first_token_scale and getattr(model, "cls_token", None) is None:
            raise ValueError("first_token_scale needs a class token at position 0; this model "
                             "has none")
        model = rewrite_transformer(model, factory, {Attention: QAttention})
        # After pooling there is no token axis: these take the pooled class token (or mean).
        for name in ("fc_norm", "head", "head_dist"):
            m = getattr(model, name, None)
            if isinstance(m, QuantModule):
                m.first_q = None
        tokens = [n for n in ("pos_embed", "cls_token", "dist_token", "reg_token")
                  if isinstance(getattr(model, n, None), nn.Parameter)]
        attach_param_quantizers(model, tokens, factory)
        return model

    def lower(self, model: nn.Module):
        from ..integer.lower_vit import lower_vit

        return lower_vit(model)

    def reparameterize(self, model: nn.Module, run: Callable[[], object]) -> None:
        pairs = []
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block:  # a post-norm block's LayerNorm output is the residual
                raise ValueError(f"post_ln_reparam needs pre-norm blocks; block {i} is "
                                 f"{type(blk).__name__}")
            pairs += [(blk.norm1, [blk.attn.qkv]), (blk.norm2, [blk.mlp.fc1])]
        reparameterize_post_ln(pairs, run)

    def architecture(self, model: nn.Module) -> dict:
        blk = model.blocks[0]
        pe = model.patch_embed
        kwargs = {
            "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
            "in_chans": pe.proj.in_channels, "num_classes": model.num_classes,
            "embed_dim": model.embed_dim, "depth": len(model.blocks),
            "num_heads": blk.attn.num_heads,
            "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
            "qkv_bias": blk.attn.qkv.bias is not None,
            "class_token": model.cls_token is not None, "global_pool": model.global_pool,
            "no_embed_class": model.no_embed_class, "reg_tokens": model.num_reg_tokens,
            "fc_norm": not isinstance(model.fc_norm, nn.Identity),
            "pre_norm": not isinstance(model.norm_pre, nn.Identity),
            # Any value creates LayerScale's gamma; the loaded state sets it.
            "init_values": 1.0 if isinstance(blk.ls1, LayerScale) else None,
        }
        name = timm_model_name(model)
        if name:
            return {"family": self.family, "name": name, "kwargs": kwargs}
        # Built from its class: what a registered name would have decided is recorded too.
        attn, mlp = blk.attn, blk.mlp
        return class_architecture(self, model, {
            **kwargs,
            "mlp_ratio": mlp_ratio(mlp.fc1.out_features, model.embed_dim),
            "init_values": getattr(blk.ls1, "init_values", 1.0) if kwargs["init_values"] else None,
            "proj_bias": attn.proj.bias is not None,
            "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
            "scale_attn_norm": not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
            "scale_mlp_norm": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
            "pos_embed": "learn" if model.pos_embed is not None else "none",
            "final_norm": not (isinstance(model.norm, nn.Identity)
                               and isinstance(model.fc_norm, nn.Identity)),
            "pool_include_prefix": model.pool_include_prefix,
            "dynamic_img_size": model.dynamic_img_size,
            "dynamic_img_pad": pe.dynamic_img_pad,
        })
