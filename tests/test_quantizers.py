"""Properties of the quantizers: integer rebuild, error bounds, monotonicity, calibration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.quantizers import (
    GELU_MIN,
    ChannelPow2Quantizer,
    Log2Quantizer,
    TwoScaleValueQuantizer,
    UniformQuantizer,
    coarse_to_fine,
)

PROPS = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**31 - 1)
POINTS = 12  # candidates per search: enough to exercise it, cheap on small tensors


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mse(x: torch.Tensor):
    return lambda xq: ((xq - x) ** 2).mean()


def check_rebuild(q, make, x: torch.Tensor) -> None:
    """Codes are int32 in [0, 2^b - 1], and a fresh quantizer loaded from the state dict rebuilds
    ``q(x)`` bit for bit from the codes alone."""
    codes = q.codes(x)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**q.bits - 1
    fresh = make()
    fresh.load_state_dict(q.state_dict())
    rebuilt = fresh.integer(codes).float() * fresh.step(x)
    assert torch.equal(rebuilt, q(x))


def tol(x: torch.Tensor) -> torch.Tensor:
    """Float32 slack of x / s and of integer * s."""
    return 1e-6 * x.abs() + 1e-12


def assert_nondecreasing(y: torch.Tensor, dim: int = -1) -> None:
    assert bool((y.diff(dim=dim) >= 0).all())


def fill(lo: torch.Tensor, hi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Points of [lo, hi] (broadcast) at fractions ``u`` in [0, 1]."""
    return lo + (hi - lo) * u


# --------------------------------------------------------------------------- uniform


@PROPS
@given(seed=seeds, bits=st.integers(2, 16), symmetric=st.booleans(),
       spread=st.floats(1e-2, 1e3), offset=st.floats(-2.0, 2.0))
def test_uniform_per_tensor(seed, bits, symmetric, spread, offset):
    g = gen(seed)
    x = (torch.randn(64, 8, generator=g) + offset) * spread
    make = lambda: UniformQuantizer(bits, symmetric=symmetric)  # noqa: E731
    q = make()
    q.calibrate(x, mse(x), POINTS)
    assert bool(q.calibrated)
    check_rebuild(q, make, x)
    s, z = q.scale, q.zero_point.float()
    lo, hi = -z * s, (2**bits - 1 - z) * s
    y = fill(lo, hi, torch.rand(4096, generator=g))
    assert bool(((y - q(y)).abs() <= s / 2 + tol(y)).all())
    wide = torch.linspace(float(lo) * 3 - 1, float(hi) * 3 + 1, 4096)
    assert_nondecreasing(q(wide))


@PROPS
@given(seed=seeds, bits=st.integers(2, 16), symmetric=st.booleans(),
       channels=st.integers(1, 12))
def test_uniform_per_channel(seed, bits, symmetric, channels):
    g = gen(seed)
    ch_scale = torch.exp(2 * torch.randn(channels, 1, generator=g))
    x = torch.randn(channels, 16, generator=g) * ch_scale + torch.randn(channels, 1, generator=g)
    make = lambda: UniformQuantizer(bits, symmetric, axis=0, channels=channels)  # noqa: E731
    q = make()
    q.calibrate(x, None, POINTS, channel_loss=lambda xq: ((xq - x) ** 2).sum(1))
    check_rebuild(q, make, x)
    s, z = q.scale[:, None], q.zero_point.float()[:, None]
    lo, hi = -z * s, (2**bits - 1 - z) * s
    y = fill(lo, hi, torch.rand(channels, 512, generator=g))
    assert bool(((y - q(y)).abs() <= s / 2 + tol(y)).all())
    y_sorted = y.sort(dim=1).values
    assert_nondecreasing(q(y_sorted), dim=1)


@PROPS
@given(seed=seeds, bits=st.integers(2, 10), symmetric=st.booleans())
def test_uniform_set_from_range_covers_range(seed, bits, symmetric):
    g = gen(seed)
    lo, hi = -torch.rand((), generator=g) * 5, torch.rand((), generator=g) * 5 + 1e-2
    q = UniformQuantizer(bits, symmetric=symmetric)
    q.set_from_range(lo, hi)
    x = fill(lo, hi, torch.rand(2048, generator=g))
    check_rebuild(q, lambda: UniformQuantizer(bits, symmetric=symmetric), x)
    # Min-max: all of [lo, hi] within half a step, plus what rounding the scale to float16
    # (relative error <= 2^-11) can cost at the top code.
    slack = (2**bits - 1) * 2.0**-11
    assert bool(((x - q(x)).abs() <= q.scale * (0.5 + slack) + tol(x)).all())


def test_uniform_min_max_covers_hi_at_16_bits():
    q = UniformQuantizer(16)
    hi = torch.tensor(4.251875877380371)
    q.set_from_range(torch.tensor(0.0), hi)
    assert float((hi - q(hi)).abs()) <= float(q.scale) / 2  # it is ~30 steps off


def test_uniform_small_range_keeps_its_levels():
    q = UniformQuantizer(8)
    q.set_from_range(torch.tensor(0.0), torch.tensor(1e-3))
    levels = q(torch.linspace(0, 1e-3, 4096)).unique().numel()
    assert levels >= 200  # 17 levels instead of 256


# --------------------------------------------------------------------------- V-2SF

V2SF_CASES = [("value", False), ("value", True), ("sign", True)]


def v2sf_data(signed: bool, g: torch.Generator, spread: float) -> torch.Tensor:
    if signed:  # post-GELU: >= GELU_MIN
        return F.gelu(torch.randn(32, 32, generator=g) * spread)
    # post-softmax: in [0, 1], rows summing to 1
    return (torch.randn(32, 32, generator=g) * spread).softmax(-1)


def check_v2sf(q: TwoScaleValueQuantizer, x: torch.Tensor, g: torch.Generator) -> None:
    make = lambda: TwoScaleValueQuantizer(q.bits, q.region_rule, q.signed)  # noqa: E731
    check_rebuild(q, make, x)
    s, m, z = q.scale, int(q.shift), int(q.zero_point)
    coarse = s * 2**m
    lo, hi = -z * s, (q._coarse_start(m, z) + q.coarse_max) * coarse
    y = fill(lo, hi, torch.rand(8192, generator=g))
    err = (y - q(y)).abs()
    # Anywhere in range: at most half a coarse step.
    assert bool((err <= coarse / 2 + tol(y)).all())
    # The fine region (below the split, and below zero for the sign rule): half a fine step.
    fine = y < q.split_threshold
    if q.region_rule == "sign":
        fine &= y < 0
    assert bool((err[fine] <= s / 2 + tol(y[fine])).all())
    # Monotone, also outside the range.
    wide = torch.linspace(min(float(lo), GELU_MIN) - 1, float(hi) * 2 + 1, 8192)
    assert_nondecreasing(q(wide))


@PROPS
@given(seed=seeds, bits=st.integers(3, 16), case=st.sampled_from(V2SF_CASES),
       spread=st.floats(0.1, 8.0), share=st.sampled_from([0.5, 0.25, 0.75]))
def test_v2sf_calibrated(seed, bits, case, spread, share):
    rule, signed = case
    g = gen(seed)
    x = v2sf_data(signed, g, spread)
    q = TwoScaleValueQuantizer(bits, region_rule=rule, signed=signed)
    q.set_restrict({"fine_share": share})
    q.calibrate(x, mse(x), POINTS)
    want = min(max(round(share * 2**bits), 2), 2**bits - 2)
    assert int(q.fine_codes) == want
    assert int(q.codes(torch.tensor([1e9]))) == 2**bits - 1  # the top code is coarse's last
    assert bool(q.calibrated)
    if signed and rule == "value":
        assert 0 <= int(q.zero_point) <= (q.payload_max + 1) // 2
    check_v2sf(q, x, g)


@PROPS
@given(seed=seeds, bits=st.integers(3, 12), case=st.sampled_from(V2SF_CASES),
       scale=st.floats(1e-3, 1.0), shift=st.integers(0, 7), zero_frac=st.floats(0.0, 1.0))
def test_v2sf_set_params(seed, bits, case, scale, shift, zero_frac):
    rule, signed = case
    q = TwoScaleValueQuantizer(bits, region_rule=rule, signed=signed)
    z = round(zero_frac * q.payload_max) if signed else 0
    if rule == "value":
        z = min(z, (q.payload_max + 1) // 2)
    q.set_params(scale, shift, z)
    g = gen(seed)
    check_v2sf(q, v2sf_data(signed, g, 2.0), g)


def test_v2sf_softmax_coarse_grid_reaches_one():
    for bits in (4, 6, 8):
        x = torch.rand(64, 49, generator=gen(bits)).softmax(-1)
        q = TwoScaleValueQuantizer(bits, "value", signed=False)
        q.calibrate(x, mse(x))
        top = float(q.scale) * 2 ** int(q.shift) * q.coarse_max
        assert top == pytest.approx(1.0, abs=1e-3), bits
        assert float(q(torch.ones(1))) == pytest.approx(1.0, abs=1e-3)


def test_v2sf_sign_rule_splits_by_sign():
    q = TwoScaleValueQuantizer(4, "sign", signed=True)
    q.set_params(0.01, 3, q.payload_max)
    codes = q.codes(torch.tensor([-0.05, -1e-4, 0.0, 1e-4, 0.3]))
    assert (codes >= 2 ** (q.bits - 1)).tolist() == [False, False, True, True, True]


def test_v2sf_uneven_share_survives_bits_change_and_checkpoint_state():
    q = TwoScaleValueQuantizer(4, "value", signed=True)
    q.set_restrict({"fine_share": 0.75})
    x = F.gelu(torch.randn(4096, generator=gen(1)) * 3)
    q.calibrate(x, mse(x))
    assert int(q.fine_codes) == 12
    twin = TwoScaleValueQuantizer(4, "value", signed=True)
    twin.load_state_dict(q.state_dict())
    assert torch.equal(twin(x), q(x))
    q.set_bits(6)  # a new width resets the share to an even split until recalibrated
    assert int(q.fine_codes) == 32
    with pytest.raises(ValueError, match="fine_share"):
        q.set_fine_share(1.0)


def test_twin_gelu_without_negative_tail():
    x = torch.rand(1000, generator=gen(0)) * 3
    q = TwoScaleValueQuantizer(8, "sign", signed=True)
    q.calibrate(x, mse(x))
    assert float(mse(x)(q(x))) < 1e-3 * float((x**2).mean())


# --------------------------------------------------------------------------- O-2SF / PTF


def outlier_data(g: torch.Generator, rows: int = 256, channels: int = 64,
                 outliers=(5, 17, 42), factor: float = 50.0) -> torch.Tensor:
    x = torch.randn(rows, channels, generator=g) + 0.3 * torch.randn(channels, generator=g)
    x[:, list(outliers)] *= factor
    return x


@PROPS
@given(seed=seeds, bits=st.integers(2, 16), rule=st.sampled_from(["o2sf", "ptf"]),
       outlier_rule=st.sampled_from(["threshold", "sorted_split"]),
       channels=st.integers(4, 16), factor=st.floats(1.0, 100.0))
def test_channel_pow2(seed, bits, rule, outlier_rule, channels, factor):
    g = gen(seed)
    n_out = int(torch.randint(0, channels // 4 + 1, (), generator=g))
    x = outlier_data(g, 48, channels, torch.randperm(channels, generator=g)[:n_out].tolist(),
                     factor)
    make = lambda: ChannelPow2Quantizer(bits, channels, rule, outlier_rule)  # noqa: E731
    q = make()
    q.calibrate(x, mse(x), POINTS)
    check_rebuild(q, make, x)
    exps = set(q.exponent.tolist())
    if rule == "ptf":
        assert exps <= {0, 1, 2, 3}
    else:  # one flag bit per channel: 0 or the shared outlier exponent
        assert 0 in exps and len(exps) <= 2 and max(exps) <= 6
    step = q.scale * 2.0 ** q.exponent.float()  # per channel
    z = q.zero_point.float()
    lo, hi = -z * step, (2**bits - 1 - z) * step
    y = fill(lo, hi, torch.rand(512, channels, generator=g))
    assert bool(((y - q(y)).abs() <= step / 2 + tol(y)).all())
    y_sorted = torch.cat([y, x]).sort(dim=0).values
    assert_nondecreasing(q(y_sorted), dim=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("outlier_rule", ["threshold", "sorted_split"])
def test_o2sf_flags_outlier_channels_and_beats_uniform(bits, outlier_rule):
    x = outlier_data(gen(0))
    q = ChannelPow2Quantizer(bits, 64, "o2sf", outlier_rule)
    q.calibrate(x, mse(x))
    assert q.outlier_channels == [5, 17, 42]
    assert len(set(q.exponent[[5, 17, 42]].tolist())) == 1  # one shared outlier exponent
    u = UniformQuantizer(bits)
    u.calibrate(x, mse(x))
    assert float(mse(x)(q(x))) < float(mse(x)(u(x)))
    normal = [c for c in range(64) if c not in (5, 17, 42)]  # where the gain is: >10x less error
    xn = x[:, normal]
    assert float(mse(xn)(q(x)[:, normal])) < float(mse(xn)(u(x)[:, normal])) / 10


def test_ptf_exponents():
    x = outlier_data(gen(1), factor=6.0)
    q = ChannelPow2Quantizer(8, 64, "ptf")
    q.calibrate(x, mse(x))
    exps = q.exponent.tolist()
    assert set(exps) <= {0, 1, 2, 3}
    assert all(exps[c] == 3 for c in (5, 17, 42))  # the widest channels take the widest grid
    assert max(e for c, e in enumerate(exps) if c not in (5, 17, 42)) < 3


# --------------------------------------------------------------------------- log2


@PROPS
@given(seed=seeds, bits=st.integers(2, 16), spread=st.floats(0.1, 10.0))
def test_log2(seed, bits, spread):
    g = gen(seed)
    x = (torch.randn(16, 64, generator=g) * spread).softmax(-1)
    make = lambda: Log2Quantizer(bits)  # noqa: E731
    q = make()
    q.calibrate(x, mse(x))
    check_rebuild(q, make, x)
    assert_nondecreasing(q(torch.cat([torch.linspace(-1, 2, 4096), x.flatten()]).sort().values))
    # Inside [2^-Q, 1]: within half a step on the log2 scale.
    y = 2.0 ** (-q.exp_max * torch.rand(4096, generator=g))
    ratio = q(y) / y
    assert bool(((ratio >= 2**-0.5 * (1 - 1e-6)) & (ratio <= 2**0.5 * (1 + 1e-6))).all())
    assert float(q(torch.zeros(1))) == 0.0 and float(q(torch.ones(1))) == 1.0


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
@pytest.mark.parametrize("make", [
    UniformQuantizer, TwoScaleValueQuantizer, Log2Quantizer,
    lambda b: ChannelPow2Quantizer(b, 4)], ids=["uniform", "v2sf", "log2", "pow2"])
def test_bits_out_of_range(make, bits):
    with pytest.raises(ValueError, match="bits"):
        make(bits)


def test_two_scale_needs_three_bits():
    with pytest.raises(ValueError, match="3 bits"):
        TwoScaleValueQuantizer(2)
    TwoScaleValueQuantizer(3)


def test_unknown_rules():
    with pytest.raises(ValueError, match="region rule"):
        TwoScaleValueQuantizer(8, region_rule="magnitude")
    with pytest.raises(ValueError, match="exponent rule"):
        ChannelPow2Quantizer(8, 4, rule="pow")
    with pytest.raises(ValueError, match="outlier rule"):
        ChannelPow2Quantizer(8, 4, outlier_rule="top")


def test_uncalibrated_or_disabled_is_identity():
    x = torch.randn(10)
    q = UniformQuantizer(4)
    assert torch.equal(q(x), x)
    q.calibrate(x, mse(x))
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_scales_are_float16_exact():
    x = torch.randn(256) * 3.3
    for q in (UniformQuantizer(8), TwoScaleValueQuantizer(8, signed=True),
              ChannelPow2Quantizer(8, 16)):
        xs = x.reshape(16, 16) if isinstance(q, ChannelPow2Quantizer) else x
        q.calibrate(xs, mse(xs))
        assert bool(q.calibrated)
        assert torch.equal(q.scale.half().float(), q.scale)


def test_v2sf_coarse_offset_uses_every_code():
    """With the offset, no coarse code repeats a fine value; without it, some do."""
    for offset, expect_overlap in ((True, False), (False, True)):
        q = TwoScaleValueQuantizer(6, coarse_offset=offset)
        q.set_params(0.01, 2)
        codes = torch.arange(64, dtype=torch.int32)
        values = q.integer(codes)
        fine, coarse = values[:32], values[32:]
        overlap = bool(torch.isin(coarse, fine).any())
        assert overlap is expect_overlap
        assert (coarse.diff() > 0).all() and int(coarse.min()) > int(fine.max()) or not offset


@PROPS
@given(scale=st.floats(1e-3, 0.2), x_min=st.floats(-0.17, -1e-4), shift=st.integers(0, 7),
       share=st.sampled_from([0.5, 0.25, 0.75]))
def test_v2sf_aligned_gelu_zero_meets_the_coarse_grid(scale, x_min, shift, share):
    """``aligned_zero`` at 8 bits: the fine top t = F − 1 − z lands on t ≡ 0 or −1 (mod 2^m)
    (unless half the fine codes would not do), the zero point only raised (the negative tail
    keeps its codes), by less than 2^m. Below 8 bits, and off, it is the paper's."""
    plain = TwoScaleValueQuantizer(8, "value", signed=True)
    plain.set_fine_share(share)
    z0 = plain._zero_for(scale, x_min, shift)
    for bits, aligned in ((8, True), (6, True), (8, False)):
        q = TwoScaleValueQuantizer(bits, "value", signed=True, aligned_zero=aligned)
        q.set_fine_share(share)
        z = q._zero_for(scale, x_min, shift)
        if bits < 8 or not aligned:
            assert z == min(math.ceil(-x_min / scale - 1e-6), (q.payload_max + 1) // 2)
            continue
        assert z0 <= z < z0 + (1 << shift) and z <= (q.payload_max + 1) // 2
        step = 1 << shift
        reachable = any((q.payload_max - y) % step in (0, step - 1)
                        for y in range(z0, (q.payload_max + 1) // 2 + 1))
        assert ((q.payload_max - z) % step in (0, step - 1)) == reachable or z == z0


@PROPS
@given(seed=seeds, spread=st.floats(0.1, 8.0))
def test_v2sf_aligned_gelu_zero_calibrates_aligned(seed, spread):
    """The calibrated 8-bit post-GELU quantizer keeps every V-2SF property with its aligned
    zero point (the default of ``QuantConfig.aligned_gelu_zero``)."""
    x = v2sf_data(True, gen(seed), spread)
    q = TwoScaleValueQuantizer(8, "value", signed=True, aligned_zero=True)
    q.calibrate(x, mse(x), POINTS)
    step = 1 << int(q.shift)
    t = q.payload_max - int(q.zero_point)
    most = int(q.zero_point) == (q.payload_max + 1) // 2  # half the fine codes: the cap
    assert t % step in (0, step - 1) or most
    assert -int(q.zero_point) * float(q.scale) <= float(x.min()) + 1e-6 or most  # tail kept
    check_v2sf(q, x, gen(seed))


# --------------------------------------------------------------------------- the search's path


@PROPS
@given(seed=seeds, bits=st.integers(3, 12), case=st.sampled_from(V2SF_CASES),
       scale=st.floats(1e-3, 1.0), shift=st.integers(0, 7), zero_frac=st.floats(0.0, 1.0),
       offset=st.booleans())
def test_v2sf_search_quant_is_fake_quant(seed, bits, case, scale, shift, zero_frac, offset):
    """The search scores candidates in floating point: the same values, bit for bit."""
    rule, signed = case
    q = TwoScaleValueQuantizer(bits, region_rule=rule, signed=signed, coarse_offset=offset)
    z = round(zero_frac * q.payload_max) if signed else 0
    if rule == "value":
        z = min(z, (q.payload_max + 1) // 2)
    q.set_params(scale, shift, z)
    x = v2sf_data(signed, gen(seed), 4.0) * 3
    assert torch.equal(q.search_quant(x), q.fake_quant(x))


@PROPS
@given(seed=seeds, bits=st.integers(2, 16), symmetric=st.booleans(), per_channel=st.booleans(),
       alpha=st.floats(0.05, 1.2))
def test_uniform_search_quant_is_fake_quant(seed, bits, symmetric, per_channel, alpha):
    x = torch.randn(64, 6, generator=gen(seed)) * 3 + 0.5
    q = UniformQuantizer(bits, symmetric, axis=1 if per_channel else None, channels=6)
    dims = 0 if per_channel else (0, 1)
    q.set_from_range(x.amin(dims), x.amax(dims), alpha)
    assert torch.equal(q.search_quant(x * 1.5), q.fake_quant(x * 1.5))


@PROPS
@given(seed=seeds, bits=st.integers(2, 12), rule=st.sampled_from(["o2sf", "ptf"]),
       shared=st.booleans(), scale=st.floats(1e-3, 1.0))
def test_pow2_search_quant_is_fake_quant(seed, bits, rule, shared, scale):
    x = torch.randn(64, 8, generator=gen(seed)) * torch.tensor([1, 1, 8, 1, 1, 30, 1, 2.0])
    q = ChannelPow2Quantizer(bits, 8, rule=rule, shared_zero=shared)
    exp = torch.randint(0, 4, (8,), generator=gen(seed + 1))
    q.set_params(scale, exp, x.amin(0), x.amax(0))
    assert torch.equal(q.search_quant(x * 1.3), q.fake_quant(x * 1.3))


@pytest.mark.parametrize("setting", ["full", "partial"])
def test_the_simulators_forward_pass_is_the_codes_path(tiny_vit, images, setting):
    """Without a recorded graph the quantizers run ``search_quant``; where autograd records,
    the integer codes: every logit is the same."""
    from conftest import FAST

    from quant import QuantConfig, quantize

    qmodel = quantize(tiny_vit, images[:8], QuantConfig(setting=setting, **FAST))
    with torch.no_grad():
        fast = qmodel(images)
    with torch.enable_grad():
        through_codes = qmodel(images.clone().requires_grad_(True))
    assert through_codes.requires_grad
    assert torch.equal(fast, through_codes.detach())


def test_coarse_to_fine_finds_a_unimodal_minimum():
    for n in (1, 7, 16, 17, 50, 100):
        for best in range(n):
            scores = [abs(i - best) + 0.5 * (i > best) for i in range(n)]
            seen = []
            got = coarse_to_fine(n, lambda i, s=scores, seen=seen: seen.append(i) or s[i])
            assert got == best and len(seen) == len(set(seen))
            assert len(seen) <= (n if n <= 16 else len(range(0, n, 8)) + 7)
    assert coarse_to_fine(50, lambda i: 1.0) == 0  # the first of equal errors
    assert coarse_to_fine(12, lambda i: float("nan") if i < 3 else float(i)) == 3
    assert coarse_to_fine(12, lambda i: float("inf")) == -1


def test_v2sf_plane_search_is_the_full_search_on_a_unimodal_plane():
    """The post-GELU (clipping × shift) plane, coarse then around the best: the candidate
    the full plane gives wherever the error is unimodal on it."""
    q = TwoScaleValueQuantizer(8, "value", signed=True)
    for na, nm in ((7, 7), (4, 7), (8, 5)):
        for best in range(na * nm):
            a0, m0 = divmod(best, nm)
            first = q._first_candidates(na * nm, (na, nm))
            near = q._plane_near(min(first, key=lambda i: abs(i // nm - a0) + abs(i % nm - m0)
                                     + 0.01 * i), (na, nm))
            assert best in near, (na, nm, best)
    assert len(q._first_candidates(49, (7, 7))) == 9


def test_per_channel_search_takes_each_channels_own_minimum():
    """Each channel's clipping, searched coarse to fine, is what the full grid gives when
    each channel's error is unimodal along the grid."""
    x = torch.randn(5, 8192, generator=gen(3)) * torch.tensor([0.5, 1, 2, 4, 8])[:, None]
    target = torch.tensor([0.35, 0.6, 0.8, 0.95, 1.15])  # the clipping each row is pulled to
    q = UniformQuantizer(8, True, axis=0, channels=5)
    lo, hi = x.amin(1), x.amax(1)
    amax = torch.maximum(-lo, hi)

    def loss(xq: torch.Tensor) -> torch.Tensor:  # unimodal in each row's scale
        step = (xq - x).abs().amax(1).clamp_min(1e-12)  # about half a step
        return (step * 254 / amax - target) ** 2

    q.calibrate(x, None, 50, channel_loss=loss)
    full = UniformQuantizer(8, True, axis=0, channels=5)
    grid = full._alphas(50, 0.3)
    errs = []
    for a in grid:
        full.set_from_range(lo, hi, a)
        errs.append(loss(full.fake_quant(x)))
    want = torch.tensor(grid)[torch.stack(errs).argmin(0)]
    full.set_from_range(lo, hi, want)
    assert torch.equal(q.scale, full.scale)
