"""The integer setting: the calibrated model is an integer program, the engine runs the saved
checkpoint bit-identically with integer tensors only, and no accumulator wraps."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST

from quant import QuantConfig, load_quantized, quantize, save_quantized
from quant.evaluate import compare, logits_of
from quant.integer import AccumulatorOverflowError, IntegerEngine
from quant.integer.program import FLOAT_OPS, RUNNERS
from quant.zoo.data import digits_data
from quant.zoo.models import load_model


@pytest.fixture(scope="module")
def digits():
    return digits_data()


@pytest.fixture(scope="module")
def digits_vit():
    return load_model("digits_vit")


@pytest.fixture(scope="module")
def digits_integer(digits_vit, digits):
    return quantize(digits_vit, digits.calib, QuantConfig(setting="integer"))


def _roundtrip(qmodel, x, tmp_path):
    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    engine = IntegerEngine.load(path)
    assert torch.equal(engine(x), qmodel(x))
    assert torch.equal(load_quantized(path)(x), qmodel(x))
    return engine


def test_digits_integer_is_close_to_fp32_and_bit_identical_in_the_engine(
        digits_integer, digits_vit, digits, tmp_path):
    fp = logits_of(digits_vit, digits.x_test)
    res = compare(fp, logits_of(digits_integer, digits.x_test), digits.y_test)
    assert res.agreement >= 0.99
    assert res.fp32_top1 - res.top1 <= 0.005
    _roundtrip(digits_integer, digits.x_test, tmp_path)


def test_no_float_tensor_between_the_input_quantizer_and_the_logits(digits_integer, digits,
                                                                    tmp_path):
    engine = _roundtrip(digits_integer, digits.x_test[:8], tmp_path)
    seen = engine.trace(digits.x_test[:8])
    kinds = [op.kind for op, _ in seen]
    assert kinds[0] == "quantize_image" and kinds[-1] == "dequantize"
    assert not FLOAT_OPS & set(kinds[1:-1])
    assert {"layernorm", "softmax", "gelu", "residual", "linear", "matmul"} <= set(kinds)
    for op, out in seen[:-1]:
        assert not out.is_floating_point(), f"{op.kind} -> {out.dtype}"
        for name, t in op.tensors.items():
            if (op.kind, name) != ("quantize_image", "scale"):
                assert not t.is_floating_point(), f"{op.kind}.{name} is {t.dtype}"
    assert seen[-1][1].dtype == torch.float32
    assert set(kinds) <= set(RUNNERS)


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_test_models_are_bit_identical_in_the_engine(quantized, images, name, tmp_path):
    qmodel = quantized(name, setting="integer")
    _roundtrip(qmodel, images, tmp_path)
    full = quantized(name, setting="full")
    fp = full.model  # the full setting's twin: the integer one is close to it
    cos = torch.nn.functional.cosine_similarity(qmodel(images), full(images), dim=-1)
    assert float(cos.mean()) > 0.95, (name, fp.__class__.__name__)


def test_report_lists_multipliers_shifts_and_accumulator_bits(digits_integer):
    rows = digits_integer.program.report()
    linear = [r for r in rows if "worst_case_bits" in r and "chunks" in r]
    assert linear and all(r["worst_case_bits"] <= 32 and r["chunks"] == 1 for r in linear)
    assert any("multiplier" in str(r) and "shift" in str(r) for r in rows)
    # a V-2SF operand is two matmuls: its requantization input is wider than one accumulator
    fc2 = next(r for r in rows if r["layer"] == "blocks.0.mlp.fc2")
    assert fc2["requant_input_bits"] > fc2["worst_case_bits"]


def test_an_accumulator_beyond_int32_is_split_never_wrapped(tiny_vit, images):
    cfg = QuantConfig(**FAST, method="uniform", w_bits=13, a_bits=15, setting="integer")
    qmodel = quantize(tiny_vit, images, cfg)
    split = [op for op in qmodel.program.ops if op.attrs.get("chunks", 1) > 1]
    assert split, "expected a layer whose worst case exceeds int32"
    assert all(op.info["worst_case_bits"] > 32 for op in split)
    out = qmodel(images)
    for op in split:  # the same layers in one int64 matmul: the chunks lost nothing
        op.attrs["chunks"] = 1
    assert torch.equal(qmodel(images), out)


def test_a_product_beyond_int32_is_a_clear_error(tiny_vit, images):
    cfg = QuantConfig(**FAST, method="uniform", w_bits=16, a_bits=16, setting="integer")
    with pytest.raises(AccumulatorOverflowError, match="lower its bit widths"):
        quantize(tiny_vit, images, cfg)


def test_integer_setting_takes_no_disabled_kinds():
    with pytest.raises(ValueError, match="integer setting"):
        QuantConfig(setting="integer", disabled=frozenset({"ln_input"}))


def test_a_float_checkpoint_has_no_program(quantized, tmp_path):
    from quant import CheckpointError

    path = save_quantized(quantized("vit"), tmp_path / "f.safetensors")
    assert load_quantized(path).program is None
    with pytest.raises(CheckpointError, match="no integer program"):
        IntegerEngine.load(path)
