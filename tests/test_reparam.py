"""RepQ-ViT's post-LayerNorm reparameterization (``QuantConfig.post_ln_reparam``): the FP function
is unchanged, the channels it equalises come out equal, and the quantized model saves and loads
like any other."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAST

from quant import QuantConfig, load_quantized, quantize, save_quantized
from quant.adapters import adapter_for_family
from quant.reparam import channel_ranges
from quant.zoo.data import digits_data
from quant.zoo.models import load_model


@pytest.fixture(scope="module")
def digits():
    return load_model("digits_vit").eval(), digits_data(calib_size=16)


def test_function_unchanged_and_ranges_equalised(digits):
    model, data = digits
    fp = copy.deepcopy(model)
    norms = [n for blk in fp.blocks for n in (blk.norm1, blk.norm2)]
    before = channel_ranges(norms, lambda: fp(data.calib))
    width = before[0][1] - before[0][0]
    assert float(width.max() / width.min()) > 2  # the ranges differ to begin with
    with torch.no_grad():
        adapter_for_family("timm_vit").reparameterize(fp, lambda: fp(data.calib))
        assert torch.allclose(fp(data.x_test), model(data.x_test), atol=1e-4, rtol=1e-4)
    for lo, hi in channel_ranges(norms, lambda: fp(data.calib)):
        assert torch.allclose(hi - lo, (hi - lo).mean().expand_as(lo), rtol=1e-3)
        mid = (hi + lo) / 2
        assert torch.allclose(mid, mid.mean().expand_as(mid), atol=1e-3)
    fresh = dict(load_model("digits_vit").named_parameters())
    for p_name, p in model.named_parameters():  # the caller's model is not touched
        assert torch.equal(p, fresh[p_name])


def test_quantized_with_reparam_round_trips(digits, tmp_path):
    model, data = digits
    cfg = QuantConfig(**FAST, calib_size=16, post_ln_reparam=True)
    q = quantize(model, data.calib, cfg)
    plain = quantize(model, data.calib, QuantConfig(**FAST, calib_size=16))
    blk = q.model.blocks[0]
    assert not torch.equal(blk.norm1.weight, plain.model.blocks[0].norm1.weight)
    with torch.no_grad():
        out = q(data.x_test)
        ref = model(data.x_test)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    again = load_quantized(save_quantized(q, tmp_path / "repq.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(data.x_test), out)


def test_refused_where_it_cannot_apply(tiny_swin, images):
    with pytest.raises(ValueError, match="alternatives"):
        QuantConfig(post_ln_reparam=True, post_ln_two_scale=True)
    with pytest.raises(ValueError, match="not offered for the timm_swin family"):
        quantize(tiny_swin, images, QuantConfig(**FAST, post_ln_reparam=True))


def test_class_token_quantizers_on_a_vit(digits, tmp_path):
    """``first_token_scale`` on a timm ViT: the class token (position 0) gets its own input
    quantizers in the LayerNorms and the per-token Linears; the head's input (the pooled class
    token, 2-D) has no token axis to split. A model without a class token refuses it."""
    import timm

    from quant.modules import QLayerNorm, QLinear

    model, data = digits
    q = quantize(model, data.calib, QuantConfig(**FAST, calib_size=16, first_token_scale=True))
    blk = q.model.blocks[0]
    for m in (blk.norm1, blk.norm2, blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        assert isinstance(m, QLayerNorm | QLinear) and bool(m.first_q.calibrated)
    assert q.model.head.first_q is None and q.model.fc_norm.first_q is None
    again = load_quantized(save_quantized(q, tmp_path / "cls.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(data.x_test), q(data.x_test))
    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, depth=1, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        quantize(pooled, data.calib, QuantConfig(**FAST, calib_size=4, first_token_scale=True))
