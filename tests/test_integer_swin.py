"""The integer setting for timm's Swin Transformer: shifted windows, relative position bias and
masks, PatchMerging, average pooling and the head, all on integers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import shifted_window_swin
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch import nn

from quant import QuantConfig, load_quantized, quantize, save_quantized
from quant.integer import IntegerEngine
from quant.integer.dyadic import dyadic
from quant.integer.lower import LOG2E
from quant.integer.lower_swin import _mask_integers
from quant.integer.matmul import INT32_MAX
from quant.integer.program import INTEGER_DTYPES, RUNNERS, Op
from quant.integer.softmax import int_softmax

# conftest's shifted_window_swin: 64×64 images, patch 4: a 16×16 grid in windows of 4 (shifted
# every second block), then PatchMerging to 8×8 (still shifted windows). 32 channels at the end
# and 64 tokens make the pooled sum wide enough to take the head's extra requantization.
CONFIG = dict(calib_size=8, search_points=8)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return shifted_window_swin()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def qint(model, calib):
    return quantize(model, calib, QuantConfig(setting="integer", **CONFIG))


@pytest.fixture(scope="module")
def qfull(model, calib):
    return quantize(model, calib, QuantConfig(setting="full", **CONFIG))


def _centred_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of the logits about their batch mean (a random model's logits share a
    large common part that would hide every difference)."""
    out, ref = out - out.mean(0), ref - ref.mean(0)
    return float((out - ref).norm() / ref.norm())


def test_integer_logits_close_to_fp(model, qint, qfull, images):
    with torch.no_grad():
        fp, full, integer = model(images), qfull(images), qint(images)
    assert qint.program is not None and qfull.program is None
    # Measured: 0.039 (integer) against 0.037 (full); top-1 16/16 for both.
    e_int, e_full = _centred_error(integer, fp), _centred_error(full, fp)
    assert e_int < 0.08
    assert e_int < 1.5 * e_full + 0.01
    assert int((integer.argmax(1) == fp.argmax(1)).sum()) >= 14
    assert float(nn.functional.cosine_similarity(integer, fp).min()) > 0.99


def test_checkpoint_runs_bit_identically(qint, images, tmp_path):
    path = save_quantized(qint, tmp_path / "swin.safetensors")
    with torch.no_grad():
        ref = qint(images)
        assert torch.equal(IntegerEngine.load(path)(images), ref)
        assert torch.equal(load_quantized(path)(images), ref)


def test_only_integers_between_the_ends(qint, images):
    trace = IntegerEngine(qint.program).trace(images)
    kinds = [op.kind for op, _ in trace]
    assert kinds[0] == "quantize_image" and kinds[-1] == "dequantize"
    for op, out in trace[1:-1]:
        assert out.dtype in INTEGER_DTYPES, (op.kind, op.output, out.dtype)
    for op, _ in trace:
        assert all(not t.is_floating_point() for t in op.tensors.values()) or \
            op.kind in ("quantize_image", "dequantize"), op.kind
    for kind in ("tokens_to_grid", "roll", "window_partition", "window_reverse", "window_bias",
                 "patch_merge", "sum_spatial"):
        assert kind in kinds
    masked = [op for op, _ in trace if op.kind == "window_bias" and "mask" in op.tensors]
    assert len(masked) == 2  # the second block of each stage
    assert any(op.info.get("layer") == "head.pool_grid" for op, _ in trace)


def test_windows_bias_and_masks_are_the_models(qint, images):
    """The program's error to its own float twin grows when its windows are shifted the wrong
    way, or its masks or position bias are dropped: each carries the model's computation."""
    with torch.no_grad():
        twin = qint.model(images)
    base = _centred_error(qint.program(images), twin)

    def broken(edit) -> float:
        program = copy.deepcopy(qint.program)
        for op in program.ops:
            edit(op)
        return _centred_error(program(images), twin)

    def flip_roll(op):
        if op.kind == "roll":
            op.attrs["shifts"] = [-s for s in op.attrs["shifts"]]

    def no_mask(op):
        if op.kind == "window_bias" and "mask" in op.tensors:
            op.tensors["mask"] = torch.zeros_like(op.tensors["mask"])

    def no_bias(op):
        if op.kind == "window_bias":
            op.tensors["bias"] = torch.zeros_like(op.tensors["bias"])

    # Measured: 0.034 against 0.13, 0.087 and 0.14.
    for edit in (flip_roll, no_mask, no_bias):
        assert broken(edit) > 1.8 * base, edit.__name__


def test_window_runners_are_timms():
    x = torch.randint(-100, 100, (2, 8, 12, 5))
    part = RUNNERS["window_partition"](Op("window_partition", [], "", {"window": [4, 3]}), x)
    assert torch.equal(part, window_partition(x, (4, 3)).reshape(-1, 12, 5))
    back = RUNNERS["window_reverse"](Op("window_reverse", [], "",
                                        {"window": [4, 3], "grid": [8, 12]}), part)
    assert torch.equal(back, window_reverse(part.reshape(-1, 4, 3, 5), (4, 3), 8, 12))
    assert torch.equal(back, x)
    pm = PatchMerging(5, norm_layer=nn.Identity)
    pm.reduction = nn.Identity()
    merged = RUNNERS["patch_merge"](Op("patch_merge", [], ""), x)
    assert merged.dtype == torch.int64
    assert torch.equal(merged.double(), pm(x.double()))
    assert torch.equal(RUNNERS["sum_spatial"](Op("sum_spatial", [], ""), x), x.sum((1, 2)))


def test_mask_clamped_to_int32_still_zeroes():
    """On a very fine logits grid −100 is beyond int32: the mask is clamped, and the masked
    positions' probabilities are still exactly 0."""
    step, bound = 2e-8, 1e6
    mask = torch.tensor([[[0.0, -100.0], [-100.0, 0.0]]])
    ints = _mask_integers(mask, step, bound, "test")
    assert ints.dtype == torch.int32
    assert int(ints.min()) > -INT32_MAX and int(ints.min()) < -round(40 / step)
    logits = torch.tensor([[[[-bound, bound], [bound, -bound]]]], dtype=torch.int64)
    p = int_softmax(logits + ints, dyadic(step * LOG2E * 2.0 ** 16))
    assert int(p[0, 0, 0, 1]) == 0 and int(p[0, 0, 1, 0]) == 0
    assert int(p[0, 0, 0, 0]) == 1 << 16
    with pytest.raises(OverflowError, match="mask"):
        _mask_integers(mask, 1e-9, bound, "test")
    # On an ordinary grid the mask keeps its value.
    assert int(_mask_integers(mask, 1e-3, bound, "test").min()) == -100_000
