"""quantize(): rewriting timm models into quantized twins, calibration, inputs and reports."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FAST
from torch import nn

import quant
from quant import KINDS, METHODS, QuantConfig, UnsupportedModelError, quantize
from quant.quantizers import ChannelPow2Quantizer, Log2Quantizer, TwoScaleValueQuantizer

MODEL_NAMES = ("vit", "deit", "swin")
# Least cosine similarity of W8A8 logits to the FP model's (measured: ViT full 0.946-0.964, it
# suffers from the random model's near-zero class token; the others >= 0.985).
MIN_COSINE = {("vit", "full"): 0.93, ("deit", "full"): 0.97}
MIN_COSINE_DEFAULT = 0.995



def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def quantizers_of(qmodel, kind: str | None = None):
    return [q for _, q in qmodel.quantizers() if kind is None or q.kind == kind]


@pytest.mark.parametrize("setting", ["full", "partial"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantize(models, images, quantized, name, method, setting):
    model = models[name]
    qmodel = quantized(name, method=method, setting=setting)
    with torch.no_grad():
        ref, out = model(images), qmodel(images)
    assert out.shape == ref.shape == (16, 10)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # something was quantized
    assert cosine(out, ref) > MIN_COSINE.get((name, setting), MIN_COSINE_DEFAULT)
    # No float compute layer is left, and nothing is shared with the original.
    for m in qmodel.model.modules():
        assert not isinstance(m, nn.Linear | nn.LayerNorm | nn.Conv2d), type(m).__name__
    assert not {id(m) for m in model.modules()} & {id(m) for m in qmodel.model.modules()}
    assert not ({p.data_ptr() for p in model.parameters()}
                & {p.data_ptr() for p in qmodel.model.parameters()})
    # Every enabled quantizer is calibrated; LayerNorm inputs only in the full setting.
    for q in quantizers_of(qmodel):
        assert q.enabled == (setting == "full" or q.kind != "ln_input")
        assert bool(q.calibrated) == q.enabled
    assert quantizers_of(qmodel, "ln_input")
    assert qmodel.config == QuantConfig(**FAST, method=method, setting=setting)


SCHEMES = {  # method -> (post_softmax, post_gelu, ln_input)
    "tsptq": (("v2sf", "value"), ("v2sf", "value"), ("pow2", "o2sf")),
    "twin": (("v2sf", "value"), ("v2sf", "sign"), ("uniform", None)),
    "ptf": (("log2", None), ("uniform", None), ("pow2", "ptf")),
    "uniform": (("uniform", None), ("uniform", None), ("uniform", None)),
}


def _variant(q) -> str | None:
    if isinstance(q, TwoScaleValueQuantizer):
        return q.region_rule
    if isinstance(q, ChannelPow2Quantizer):
        return q.rule
    return None


@pytest.mark.parametrize("method", METHODS)
def test_quantizer_per_kind(quantized, method):
    qmodel = quantized("vit", method=method, setting="full")
    for kind, want in zip(("post_softmax", "post_gelu", "ln_input"), SCHEMES[method], strict=True):
        qs = quantizers_of(qmodel, kind)
        assert len(qs) == {"post_softmax": 2, "post_gelu": 2, "ln_input": 5}[kind]
        assert {(q.scheme, _variant(q)) for q in qs} == {want}
    if method == "tsptq":
        assert all(q.signed for q in quantizers_of(qmodel, "post_gelu"))
        assert not any(q.signed for q in quantizers_of(qmodel, "post_softmax"))
    for q in quantizers_of(qmodel, "weight"):
        assert q.symmetric and q.axis == 0 and q.bits == 8
    assert {q.bits for q in quantizers_of(qmodel, "image")} == {8}


def test_low_bits_reach_every_quantizer(quantized):
    qmodel = quantized("vit", w_bits=4, a_bits=4)
    for q in quantizers_of(qmodel):
        want = 8 if q.kind in ("image", "embedding") else 4
        assert q.bits == want, q.kind
    assert isinstance(quantizers_of(qmodel, "post_softmax")[0], TwoScaleValueQuantizer)


def test_ptf_softmax_is_log2(quantized):
    qmodel = quantized("swin", method="ptf")
    qs = quantizers_of(qmodel, "post_softmax")
    assert qs and all(isinstance(q, Log2Quantizer) for q in qs)


def test_original_unchanged_under_hessian(tiny_vit, images):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    modules_before = [type(m) for m in tiny_vit.modules()]
    qmodel = quantize(tiny_vit, images, QuantConfig(metric="hessian", **FAST))
    after = tiny_vit.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert [type(m) for m in tiny_vit.modules()] == modules_before
    assert all(p.grad is None for p in tiny_vit.parameters())
    assert all(p.grad is None for p in qmodel.parameters())
    assert not tiny_vit.training
    with torch.no_grad():
        assert cosine(qmodel(images), tiny_vit(images)) > MIN_COSINE[("vit", "full")]


def test_cosine_metric(tiny_swin, images):
    qmodel = quantize(tiny_swin, images, QuantConfig(metric="cosine", **FAST))
    assert qmodel.config.metric == "cosine"
    with torch.no_grad():
        assert cosine(qmodel(images), tiny_swin(images)) > MIN_COSINE_DEFAULT


def test_deterministic(tiny_vit, images, quantized):
    again = quantize(tiny_vit, images, QuantConfig(**FAST))
    first = quantized("vit")
    with torch.no_grad():
        assert torch.equal(again(images), first(images))
    assert again.info["calib_digest"] == first.info["calib_digest"]


def test_calib_size_limits_images(tiny_swin, images):
    qmodel = quantize(tiny_swin, images, QuantConfig(calib_size=4, **FAST))
    assert qmodel.info["calib_images"] == 4
    assert qmodel.info["calib_digest"] == quant.calibrate.tensor_digest(images[:4])


def test_disable_one_kind(tiny_vit, images):
    qmodel = quantize(tiny_vit, images, QuantConfig(disabled={"post_gelu"}, **FAST))
    seen = set()
    for q in quantizers_of(qmodel):
        seen.add(q.kind)
        assert q.enabled == (q.kind != "post_gelu"), q.kind
        assert bool(q.calibrated) == q.enabled
    assert seen == set(KINDS)
    assert "post_gelu" not in {v["kind"] for v in qmodel.layer_report().values()}


def test_layer_report(quantized):
    report = quantized("vit").layer_report()
    assert isinstance(report, dict)
    assert {v["kind"] for v in report.values()} == set(KINDS)
    assert all(v["enabled"] and "scheme" in v and "bits" in v for v in report.values())
    ln = [v for v in report.values() if v["kind"] == "ln_input"]
    assert all(v["scheme"] == "pow2" and set(v["exponents"]) <= set(range(7)) for v in ln)


def _sqnr(qmodel, images) -> dict[str, float]:
    with qmodel.probe_sqnr() as read, torch.no_grad():
        qmodel(images)
        result = read()
    assert all(q.probe is None for _, q in qmodel.quantizers())
    return result


def test_probe_sqnr(quantized, images):
    # MSE metric: under the Hessian-guided one, this random token-pooled ViT's final LayerNorm
    # only has gradient on the class token, so its other tokens' SQNR is legitimately ignored.
    s8 = _sqnr(quantized("vit", metric="mse"), images)
    s4 = _sqnr(quantized("vit", w_bits=4, a_bits=4, metric="mse"), images)
    computed = set(KINDS) - {"embedding"}  # quantized once, at calibration
    for s in (s8, s4):
        assert computed <= set(s) <= set(KINDS)
        assert all(isinstance(s[k], float) and math.isfinite(s[k]) for k in computed)
    assert s8["weight"] > s4["weight"] + 10  # ~6 dB per bit
    assert s8["weight"] > 30
    assert all(s8[k] > s4[k] for k in computed - {"image"})  # images stay 8-bit


def test_probe_sqnr_skips_parameters_quantized_in_place(quantized, images):
    """Position embeddings are quantized once, at calibration: no forward noise to measure."""
    assert "embedding" not in _sqnr(quantized("vit"), images)


@pytest.mark.parametrize("make, cls_name", [
    (lambda: timm.create_model("resnet18", num_classes=10), "ResNet"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "Sequential"),
])
def test_unsupported_model(images, make, cls_name):
    with pytest.raises(UnsupportedModelError, match=cls_name):
        quantize(make(), images, QuantConfig(**FAST))


def test_not_a_module(images):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize(lambda x: x, images)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(3, 32, 32), ValueError, "shape"),
    (torch.randn(2, 1, 3, 32, 32), ValueError, "shape"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ValueError, "float"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), ValueError, "float"),
    (torch.randn(0, 3, 32, 32), ValueError, "empty"),
    ([[0.0]], TypeError, "torch.Tensor"),
], ids=["rank3", "rank5", "uint8", "int64", "empty", "list"])
def test_bad_images(tiny_vit, bad, exc, match):
    with pytest.raises(exc, match=match):
        quantize(tiny_vit, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images(tiny_vit, images, value):
    bad = images[:2].clone()
    bad[1, 2, 3, 4] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(tiny_vit, bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"w_bits": 1}, "w_bits"),
    ({"a_bits": 17}, "a_bits"),
    ({"image_bits": 0}, "image_bits"),
    ({"w_bits": 8.0}, "w_bits"),
    ({"a_bits": True}, "a_bits"),
    ({"method": "foo"}, "method"),
    ({"setting": "bar"}, "setting"),
    ({"metric": "l1"}, "metric"),
    ({"outlier_rule": "top"}, "outlier_rule"),
    ({"disabled": {"nope"}}, "nope"),
    ({"calib_size": 0}, "calib_size"),
    ({"method": "tsptq", "a_bits": 2}, "a_bits >= 3"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_config_round_trip():
    cfg = QuantConfig(method="twin", w_bits=6, disabled={"qk", "value"})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["disabled"] == ["qk", "value"]
    assert QuantConfig(method="uniform", a_bits=2).a_bits == 2
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"bits": 8})


def test_post_ln_two_scale_ablation(tiny_vit, images):
    """Beyond the paper: qkv and fc1 inputs get O-2SF; proj and head inputs stay uniform."""
    from quant.quantizers import ChannelPow2Quantizer, UniformQuantizer

    q = quantize(tiny_vit, images, QuantConfig(post_ln_two_scale=True, **FAST))
    blk = q.model.blocks[0]
    assert isinstance(blk.attn.qkv.input_q, ChannelPow2Quantizer)
    assert isinstance(blk.mlp.fc1.input_q, ChannelPow2Quantizer)
    assert isinstance(blk.attn.proj.input_q, UniformQuantizer)
    assert isinstance(q.model.head.input_q, UniformQuantizer)
    plain = quantize(tiny_vit, images, QuantConfig(**FAST))
    assert isinstance(plain.model.blocks[0].attn.qkv.input_q, UniformQuantizer)


@pytest.mark.parametrize("method, channel_zero, shared", [
    ("tsptq", None, False), ("ptf", None, True), ("ptf", True, False), ("tsptq", False, True)])
def test_layernorm_zero_point_policy(tiny_vit, images, method, channel_zero, shared):
    q = quantize(tiny_vit, images,
                 QuantConfig(method=method, channel_zero_points=channel_zero, **FAST))
    ln = q.model.blocks[0].norm1.input_q
    assert ln.shared_zero is shared
    assert (ln.zero_point.unique().numel() == 1) is shared


def test_bit_overrides_and_pinned_parameters(tiny_vit, images, tmp_path):
    """Mixed precision and pinned search parameters, and an exact checkpoint round trip."""
    from quant import load_quantized, save_quantized

    cfg = QuantConfig(
        bit_overrides={"blocks.0.attn.qkv.weight_q": 4, "blocks.1.mlp.fc2.input_q": 6},
        pinned={"blocks.0.attn.a_q": {"shift": 2}, "blocks.0.norm1.input_q":
                {"threshold": 1.5, "exponent": 3}, "head.input_q": {"alpha": 0.9}}, **FAST)
    q = quantize(tiny_vit, images, cfg)
    qs = dict(q.quantizers())
    assert qs["blocks.0.attn.qkv.weight_q"].bits == 4
    assert qs["blocks.0.attn.proj.weight_q"].bits == 8
    assert qs["blocks.1.mlp.fc2.input_q"].bits == 6
    assert int(qs["blocks.0.attn.a_q"].shift) == 2
    assert set(qs["blocks.0.norm1.input_q"].exponent.tolist()) <= {0, 3}
    path = save_quantized(q, tmp_path / "mixed.safetensors")
    loaded = load_quantized(path)
    assert dict(loaded.quantizers())["blocks.0.attn.qkv.weight_q"].bits == 4
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    plain = quantize(tiny_vit, images, QuantConfig(**FAST))
    with torch.no_grad():
        assert not torch.equal(plain(images), q(images))


@pytest.mark.parametrize("overrides, match", [
    ({"bit_overrides": {"blocks.9.nope": 4}}, "no quantizer named"),
    ({"bit_overrides": {"blocks.0.attn.qkv.weight_q": 1}}, "must be an integer"),
    ({"bit_overrides": {"blocks.0.attn.a_q": 2}}, "at least 3 bits"),
    ({"pinned": {"blocks.0.attn.a_q": {"alpha": 1.0}}}, "cannot pin"),
])
def test_bad_overrides(tiny_vit, images, overrides, match):
    with pytest.raises(ValueError, match=match):
        quantize(tiny_vit, images, QuantConfig(**overrides, **FAST))


def test_calibrator_reuses_statistics_exactly(tiny_vit, images):
    """One statistics pass, many configurations: each equals a fresh ``quantize``, in any order."""
    from quant import Calibrator

    base = QuantConfig(**FAST)
    configs = [
        QuantConfig(w_bits=4, a_bits=6, **FAST),
        QuantConfig(bit_overrides={"blocks.0.attn.qkv.weight_q": 4},
                    pinned={"blocks.0.attn.a_q": {"shift": 1}}, **FAST),
        base,
    ]
    calibrator = Calibrator(tiny_vit, images, base)
    got = [calibrator.calibrate(c) for c in configs]
    with torch.no_grad():
        for cfg, q in zip(configs, got, strict=True):
            assert torch.equal(q(images), quantize(tiny_vit, images, cfg)(images))
    assert all(not m.stats for _, m in got[0].model.named_modules() if hasattr(m, "stats"))
    with pytest.raises(ValueError, match="new statistics pass"):
        calibrator.calibrate(QuantConfig(method="uniform", **FAST))


def test_calibrator_incremental_equals_full(tiny_vit, images):
    from quant import Calibrator

    cfgs = [QuantConfig(**FAST),
            QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 4}, **FAST),
            QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 4,
                                       "blocks.0.attn.a_q": 5}, **FAST)]
    inc, full = Calibrator(tiny_vit, images, cfgs[0]), Calibrator(tiny_vit, images, cfgs[0])
    # Revisits come back from the remembered calibrations, not from a new search.
    searched = []
    inc_calibrate = inc.twin.blocks[1].mlp.fc1.calibrate
    inc.twin.blocks[1].mlp.fc1.calibrate = lambda cfg: (searched.append(1), inc_calibrate(cfg))
    with torch.no_grad():
        for cfg in cfgs + [cfgs[1], cfgs[0], cfgs[2], cfgs[0]]:
            qa = inc.calibrate(cfg, incremental=True, copy_model=False)
            a = qa(images)
            qb = full.calibrate(cfg)
            assert torch.equal(a, qb(images))
            assert qa.layer_report() == qb.layer_report()
            sb = qb.model.state_dict()
            assert all(torch.equal(v, sb[k]) for k, v in qa.model.state_dict().items())
    assert len(searched) == 2  # fc1 at 8 and at 4 bits, each searched once
    assert inc.parameter_searches == 1  # the position embedding's and class token's widths


def test_a_return_to_a_full_calibration_is_a_restore(tiny_vit, images):
    """Modules calibrated by a full call and unchanged since are remembered by the first
    incremental call: going back to them after a probe searches nothing."""
    from quant import Calibrator

    base = QuantConfig(**FAST)
    probe = QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 4}, **FAST)
    cal = Calibrator(tiny_vit, images, base)
    with torch.no_grad():
        expected = cal.calibrate(base, copy_model=False)(images)
        searched = cal.modules_searched
        cal.calibrate(base, incremental=True, copy_model=False)
        cal.calibrate(probe, incremental=True, copy_model=False)
        assert cal.modules_searched == searched + 1  # fc1 at 4 bits
        assert torch.equal(cal.calibrate(base, incremental=True, copy_model=False)(images),
                           expected)
        assert cal.modules_searched == searched + 1
        assert {name for name, _ in cal.export_calibrations()["items"]} == {"blocks.1.mlp.fc1"}


def test_calibrations_shared_between_calibrators(tiny_vit, images):
    """What a search's workers do: one imports the module calibrations another searched and
    skips those searches, with the same result; calibrations of other inputs are refused."""
    from quant import Calibrator

    base = QuantConfig(**FAST)
    cand = QuantConfig(bit_overrides={"blocks.1.mlp.fc1.weight_q": 4}, **FAST)
    a, b = Calibrator(tiny_vit, images, base), Calibrator(tiny_vit, images, base)
    with torch.no_grad():
        expected = a.calibrate(cand, incremental=True, copy_model=False)(images)
        shared = a.export_calibrations()
        assert "blocks.1.mlp.fc1" in {name for name, _ in shared["items"]}
        assert a.export_calibrations()["items"] == {}  # each calibration is handed on once
        b.import_calibrations(shared)
        searched = []
        for name, m in b.twin.named_modules():
            if hasattr(m, "local_quantizers"):
                m.calibrate = lambda cfg, f=m.calibrate, n=name: (searched.append(n), f(cfg))
        assert torch.equal(b.calibrate(cand, incremental=True, copy_model=False)(images),
                           expected)
        assert searched == []
        other = Calibrator(tiny_vit, images.flip(0), base)
        with pytest.raises(ValueError, match="other calibration inputs"):
            other.import_calibrations(shared)
