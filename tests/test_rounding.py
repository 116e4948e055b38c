"""GPTQ weight rounding (``QuantConfig(weight_rounding="gptq")``, ``quant.rounding``)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST

from quant import Calibrator, QuantConfig, load_quantized, quantize, save_quantized
from quant.calibrate import integer_parameters
from quant.evaluate import compare, logits_of
from quant.integer import IntegerEngine
from quant.modules import QConv2d, QWeighted
from quant.rounding import gptq_round, inverse_hessian_factor
from quant.zoo.data import digits_data
from quant.zoo.models import load_model
from quant.zoo.text import text_data

GPTQ = dict(weight_rounding="gptq", **FAST)


def _correlated(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) / c ** 0.5 + torch.eye(c)
    return torch.randn(n, c, generator=g) @ mix * torch.linspace(0.2, 3.0, c)


def test_gptq_lowers_the_layer_error_and_stays_on_the_grid():
    x = _correlated(2000, 64, 0)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    scale = (w.abs().amax(1) / 7.5).half().float()  # float16-exact, as the quantizers keep it
    zero = torch.full((32,), 8, dtype=torch.int32)
    nearest = ((torch.round(w / scale[:, None]) + 8).clamp(0, 15) - 8) * scale[:, None]
    rounded = gptq_round(w, inverse_hessian_factor(x.t() @ x), scale, zero, 4)
    codes = rounded / scale[:, None] + 8
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15
    err = lambda wq: float(((x @ (wq - w).t()) ** 2).sum())  # noqa: E731
    assert err(rounded) < 0.7 * err(nearest)
    # Deterministic, and a dead input (never non-zero) gets a zero weight.
    x[:, 5] = 0
    factor = inverse_hessian_factor(x.t() @ x)
    again = gptq_round(w, factor, scale, zero, 4)
    assert torch.equal(again, gptq_round(w, factor, scale, zero, 4))
    assert torch.all(again[:, 5] == 0)


def test_config_refuses_an_unknown_rounding():
    with pytest.raises(ValueError, match="weight_rounding must be one of"):
        QuantConfig(weight_rounding="adaround")


@pytest.fixture(scope="module")
def pair(tiny_vit, images):
    """The tiny ViT at W4A8 with nearest and with GPTQ rounding."""
    return {r: quantize(tiny_vit, images, QuantConfig(w_bits=4, weight_rounding=r, **FAST))
            for r in ("nearest", "gptq")}


def test_gptq_changes_codes_not_the_format(pair, images, tmp_path):
    near, gptq = pair["nearest"], pair["gptq"]
    changed = 0
    for name, (_, q) in integer_parameters(gptq.model).items():
        if not name.endswith(".weight"):
            continue
        w = gptq.model.get_parameter(name).detach()
        assert torch.equal(q.fake_quant(w), w), name  # every weight is a grid point
        changed += int(not torch.equal(w, near.model.get_parameter(name).detach()))
    assert changed >= 8  # every Linear and the patch embedding conv rounded otherwise
    a = save_quantized(near, tmp_path / "a.safetensors")
    b = save_quantized(gptq, tmp_path / "b.safetensors")
    # the same tensors, dtypes and shapes: the files' sizes also count the metadata's timings
    # (calib_seconds), whose digits vary on a loaded machine
    assert _layout(a) == _layout(b)
    assert torch.equal(load_quantized(b)(images), gptq(images))


def _layout(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def test_gptq_lowers_the_error_on_images_it_did_not_see():
    """The digits ViT at W4A8, where the 4-bit weights make most of the error: on validation
    images (training images that are not calibration images) GPTQ's KL to FP32 is a fraction
    of nearest rounding's (measured 1.4e-4 against 6.0e-4 on 512 of them)."""
    model, data = load_model("digits_vit"), digits_data(val_size=128)
    fp = logits_of(model, data.x_val)
    kl = {r: compare(fp, logits_of(quantize(model, data.calib, QuantConfig(
        w_bits=4, weight_rounding=r)), data.x_val), fp.argmax(-1)).kl for r in ("nearest", "gptq")}
    assert kl["gptq"] < 0.5 * kl["nearest"], kl


def test_the_patch_embedding_rounds_on_its_unfolded_inputs(pair):
    conv = next(m for m in pair["gptq"].model.modules() if isinstance(m, QConv2d))
    near = next(m for m in pair["nearest"].model.modules() if isinstance(m, QConv2d))
    assert not torch.equal(conv.weight, near.weight)


@pytest.mark.parametrize("setting", ["partial", "integer"])
def test_every_setting(tiny_vit, images, setting, tmp_path):
    qmodel = quantize(tiny_vit, images, QuantConfig(w_bits=4, setting=setting, **GPTQ))
    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    assert torch.equal(load_quantized(path)(images), qmodel(images))
    if setting == "integer":
        assert torch.equal(IntegerEngine.load(path)(images), qmodel(images))


def test_text_encoder_padding_stays_out_of_the_hessian():
    """The sum is over real tokens only: padding the batch further changes nothing."""
    texts = text_data(calib_size=4).calib
    model = load_model("minilm")
    config = QuantConfig(w_bits=4, calib_size=4, metric="mse", **GPTQ)
    padded = {k: torch.cat([v, torch.zeros(len(v), 5, dtype=v.dtype)], 1)
              for k, v in texts.items()}
    sums = []
    for batch in (texts, padded):
        twin = Calibrator(model, batch, config).twin
        sums.append([m.stats["xtx"] for m in twin.modules() if isinstance(m, QWeighted)])
    assert len(sums[0]) == 6 * 4  # qkv, attention output, intermediate, output per layer
    for a, b in zip(*sums, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * float(a.abs().max()))


def test_calibrator_remembers_rounded_weights(tiny_vit, images):
    """A search revisiting a width gets its GPTQ weights back, not a new rounding, and every
    calibration equals a fresh one bit for bit."""
    cfgs = [QuantConfig(**GPTQ),
            QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 4}, **GPTQ),
            QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 3,
                                       "blocks.0.attn.qkv.weight_q": 4}, **GPTQ)]
    inc, fresh = Calibrator(tiny_vit, images, cfgs[0]), Calibrator(tiny_vit, images, cfgs[0])
    fc1 = inc.twin.blocks[1].mlp.fc1
    rounded = []
    original = fc1._gptq_weight
    fc1._gptq_weight = lambda *a, **k: (rounded.append(1), original(*a, **k))[1]
    with torch.no_grad():
        for cfg in cfgs + [cfgs[1], cfgs[0], cfgs[2], cfgs[1]]:
            qa = inc.calibrate(cfg, incremental=True, copy_model=False)
            qb = fresh.calibrate(cfg)
            assert torch.equal(qa(images), qb(images))
            sb = qb.model.state_dict()
            assert all(torch.equal(v, sb[k]) for k, v in qa.model.state_dict().items())
    assert len(rounded) == 3  # fc1 at 8, 4 and 3 bits, each rounded once
    # Handed to another worker's Calibrator, the rounded weights come along.
    other = Calibrator(tiny_vit, images, cfgs[0])
    other.import_calibrations({"calib_digest": inc.calib_digest, "items": dict(inc._done)})
    with torch.no_grad():
        assert torch.equal(other.calibrate(cfgs[2], incremental=True, copy_model=False)(images),
                           fresh.calibrate(cfgs[2])(images))
