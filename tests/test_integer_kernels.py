"""The integer kernels against their float functions."""

import math

import pytest
import torch

from quant.integer import kernel_errors as ke
from quant.integer.kernel_errors import kernel_errors

KEYS = {"kernel", "range", "max_abs_error", "mean_abs_error", "layers", "samples"}


@pytest.fixture(scope="module")
def integer_vit(quantized):
    return quantized("vit", setting="integer")


def test_kernel_errors_rows_and_bounds(integer_vit, images):
    rows = kernel_errors(integer_vit, images[:8])
    by = {r["kernel"]: r for r in rows}
    assert list(by) == ["softmax", "gelu", "layernorm"]
    for r in rows:
        assert set(r) == KEYS
        lo, hi = r["range"]
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
        assert 0 <= r["mean_abs_error"] <= r["max_abs_error"] and r["samples"] > 0
    # the tiny ViT: 2 blocks, 3 heads; LayerNorms: 2 per block and the final one
    assert by["softmax"]["layers"] == by["gelu"]["layers"] == 2
    assert by["layernorm"]["layers"] == 5
    # the kernels' own accuracy: Softmax within a few output steps (2^-16), GELU within its
    # tanh form's 4.7e-4 plus the output rounding, LayerNorm within a few 10^-3 (isqrt's floor)
    assert by["softmax"]["max_abs_error"] < 8 * 2.0 ** -16
    assert by["gelu"]["max_abs_error"] < 1e-3
    assert by["layernorm"]["max_abs_error"] < 5e-2
    assert by["layernorm"]["mean_abs_error"] < 2e-3


def test_kernel_errors_deterministic_and_seeded(integer_vit, images):
    a = kernel_errors(integer_vit, images[:8])
    assert a == kernel_errors(integer_vit, images[:8])
    b = kernel_errors(integer_vit, images[:8], seed=1)
    assert [r["range"] for r in a] == [r["range"] for r in b]  # the range is the data's
    assert a[0] != b[0]  # the random Softmax rows are the seed's


def test_kernel_errors_range_follows_the_inputs(integer_vit, images):
    wide = {r["kernel"]: r for r in kernel_errors(integer_vit, 3 * images[:8])}
    narrow = {r["kernel"]: r for r in kernel_errors(integer_vit, images[:8])}
    assert wide["layernorm"]["range"][1] > narrow["layernorm"]["range"][1]


def test_kernel_errors_sees_a_wrong_kernel(integer_vit, images, monkeypatch):
    good = {r["kernel"]: r for r in kernel_errors(integer_vit, images[:8])}
    monkeypatch.setattr(ke, "int_gelu", lambda x: torch.relu(x))  # ReLU is not GELU
    softmax = ke.int_softmax
    monkeypatch.setattr(ke, "int_softmax", lambda x, d, keep=None: softmax(x // 2, d))
    bad = {r["kernel"]: r for r in kernel_errors(integer_vit, images[:8])}
    assert bad["gelu"]["max_abs_error"] > 0.1 > good["gelu"]["max_abs_error"]
    assert bad["softmax"]["max_abs_error"] > 100 * good["softmax"]["max_abs_error"]


def test_kernel_errors_needs_the_integer_setting(quantized, images):
    with pytest.raises(ValueError, match="integer"):
        kernel_errors(quantized("vit"), images[:8])
