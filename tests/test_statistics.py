"""The statistics pass at real size: every calibration image reaches every statistic."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import quant.calibrate
from quant import QuantConfig
from quant.model import Calibrator
from quant.modules import Capture, QAttention, QConv2d
from quant.zoo.data import digits_data
from quant.zoo.models import load_model

IMAGES = 32
EXACT = "donot_use_mm_for_euclid_dist"  # cdist through a matmul is off by ~1e-3


def vit_b(depth: int = 2) -> torch.nn.Module:
    """ViT-B/16's shapes at 224 (197 tokens, 12 heads), random weights, few blocks."""
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth).eval()


def fp_attention(model: torch.nn.Module, images: torch.Tensor,
                 block: int = 0) -> tuple[torch.Tensor, ...]:
    """A block's scaled Q, K, V (B, H, N, D) of the FP model."""
    attn = model.blocks[block].attn
    seen = {}
    h = attn.qkv.register_forward_hook(lambda _m, _a, out: seen.update(qkv=out))
    with torch.no_grad():
        model(images)
    h.remove()
    b, n, _ = seen["qkv"].shape
    q, k, v = seen["qkv"].reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return q * attn.scale, k, v


def twin_modules(cal: Calibrator) -> tuple[QAttention, QConv2d]:
    mods = list(cal.twin.modules())
    return (next(m for m in mods if isinstance(m, QAttention)),
            next(m for m in mods if isinstance(m, QConv2d)))


@pytest.fixture(scope="module")
def vit_b_stats():
    model = vit_b()
    images = torch.randn(IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cal = Calibrator(model, images, QuantConfig(calib_size=IMAGES))  # Hessian: gradients too
    return model, images, cal


def test_attention_statistics_come_from_every_image(vit_b_stats):
    model, images, cal = vit_b_stats
    attn, _ = twin_modules(cal)
    s = attn.stats
    q, k, v = fp_attention(model, images)
    b, h, n, d = q.shape
    cap = Capture()
    assert b * h * n * n > cap.elements  # over the cap: sampled, to attention_sample values
    r = cap.attention_sample // (b * h * n)
    assert 1 < r < n and s["a"].numel() <= cap.attention_sample
    assert s["q"].shape == (b, h, r, d) and s["a"].shape == (b, h, r, n)
    assert s["g_logits"].shape == (b, h, r, n) and s["g_out"].shape == (b, h, r, d)
    assert torch.allclose(s["k"], k, atol=1e-5) and torch.allclose(s["v"], v, atol=1e-5)
    # every image and head: r distinct rows of its own Q, and A the Softmax of exactly them
    dist = torch.cdist(s["q"], q, compute_mode=EXACT)  # (B, H, r, N)
    assert float(dist.amin(-1).max()) < 1e-4
    assert bool((dist.argmin(-1).diff(dim=-1) > 0).all())
    assert torch.allclose(s["a"], (s["q"] @ k.transpose(-2, -1)).softmax(-1), atol=1e-5)
    assert bool((s["g_logits"].flatten(2).abs().amax(-1) > 0).all())
    # the last block: only the class token's row reaches the head, and it is always kept
    last = [m for m in cal.twin.modules() if isinstance(m, QAttention)][-1].stats
    assert torch.allclose(last["q"][:, :, 0], fp_attention(model, images, -1)[0][:, :, 0],
                          atol=1e-5)
    assert bool((last["g_logits"][:, :, 0].flatten(2).abs().amax(-1) > 0).all())
    assert not last["g_logits"][:, :, 1:].any()
    # the sampled Q keeps the full tensor's range
    assert float(s["q"].max()) == pytest.approx(float(q.max()), abs=1e-5)
    assert float(s["q"].min()) == pytest.approx(float(q.min()), abs=1e-5)


def test_linear_input_sample_is_random_rows_and_the_tensors_extremes(vit_b_stats):
    """Over ``Capture.rows`` a Linear's input keeps that many random rows plus the rows of the
    tensor's min and max; every channel's range travels beside it, over all rows."""
    model, images, cal = vit_b_stats
    seen = {}
    h = model.blocks[0].mlp.fc2.register_forward_hook(lambda _m, a, _o: seen.update(x=a[0]))
    with torch.no_grad():
        model(images)
    h.remove()
    full = seen["x"].reshape(-1, seen["x"].shape[-1])  # 32 · 197 rows × 3072 channels
    fc2 = dict(cal.twin.named_modules())["blocks.0.mlp.fc2"].stats
    rows = Capture().rows
    assert len(full) > rows and rows <= len(fc2["x"]) <= rows + 2
    assert float(fc2["x"].max()) == pytest.approx(float(full.max()), abs=1e-5)
    assert float(fc2["x"].min()) == pytest.approx(float(full.min()), abs=1e-5)
    assert torch.allclose(fc2["hi"], full.amax(0), atol=1e-5)
    assert torch.allclose(fc2["lo"], full.amin(0), atol=1e-5)
    assert fc2["g"].shape == (len(fc2["x"]), 768)
    # distinct rows of the input, drawn across the images (not the first ones only)
    dist = torch.cdist(fc2["x"][::64], full, compute_mode=EXACT)
    picked = dist.argmin(1)
    assert float(dist.amin(1).max()) < 1e-4 and len(set(picked.tolist())) == len(picked)
    assert len(set((picked // 197).tolist())) > IMAGES // 2
    # the weight search's rows, the sample's first 512: drawn from every image, not the first
    first = torch.cdist(fc2["x"][:512], full, compute_mode=EXACT).argmin(1) // 197
    assert len(set(first.tolist())) == IMAGES


def test_patch_embedding_statistics_come_from_every_image(vit_b_stats):
    _, images, cal = vit_b_stats
    _, conv = twin_modules(cal)
    x, g = conv.stats["x"], conv.stats["g"]
    p = Capture().elements // (IMAGES * 3 * 16 * 16)
    assert x.shape == (IMAGES, 3, 16, p * 16) and g.shape == (IMAGES, 768, 1, p)
    for i in range(IMAGES):  # image i's strip holds p distinct patches of image i
        own = F.unfold(images[i:i + 1], 16, stride=16)[0].t()  # (196, 768)
        got = F.unfold(x[i:i + 1], 16, stride=16)[0].t()  # (p, 768)
        dist = torch.cdist(got, own, compute_mode=EXACT)
        assert float(dist.amin(1).max()) < 1e-5, i
        assert len(set(dist.argmin(1).tolist())) == p
    assert float(x.max()) == float(images.max()) and float(x.min()) == float(images.min())
    # the strip's convolution gives those patches' outputs, in the gradient's layout
    w, bias = conv.weight.detach(), conv.bias.detach()
    assert conv._op(x, w, bias).shape == g.shape


def test_sampled_statistics_are_deterministic():
    model = vit_b()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(calib_size=8, metric="mse")
    first, second = (twin_modules(Calibrator(model, images, cfg)) for _ in range(2))
    assert first[0].stats["q"].shape[2] < 197  # 8 images are over the cap already
    for a, b in zip(first, second, strict=True):
        assert a.stats.keys() == b.stats.keys()
        for key in a.stats:
            assert torch.equal(a.stats[key], b.stats[key]), key
    other = twin_modules(Calibrator(model, images, QuantConfig(calib_size=8, metric="mse",
                                                               seed=1)))
    assert not torch.equal(first[0].stats["q"], other[0].stats["q"])


def test_under_the_cap_statistics_are_the_full_tensors(monkeypatch):
    """Under the cap nothing is sampled: the digits ViT's statistics are its whole tensors, and
    calibrating on them gives the same quantizers as with no cap at all."""
    model = load_model("digits_vit", "pretrained")
    calib = digits_data().calib[:IMAGES]
    cfg = QuantConfig()
    cal = Calibrator(model, calib, cfg)
    attn, conv = twin_modules(cal)
    q, k, v = fp_attention(model, calib)
    assert torch.allclose(attn.stats["q"], q, atol=1e-6)
    assert torch.allclose(attn.stats["k"], k) and torch.allclose(attn.stats["v"], v)
    assert torch.equal(conv.stats["x"], calib)
    got = cal.calibrate().state_dict()
    # the sample's size applies only over the cap: under it, A stays whole whatever it is
    monkeypatch.setattr(quant.calibrate, "Capture",
                        functools.partial(Capture, attention_sample=1 << 8))
    assert torch.equal(twin_modules(Calibrator(model, calib, cfg))[0].stats["a"],
                       attn.stats["a"])
    monkeypatch.setattr(quant.calibrate, "Capture", functools.partial(Capture, elements=1 << 40))
    want = Calibrator(model, calib, cfg).calibrate().state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in got)
