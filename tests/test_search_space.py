"""The search space: candidates, their round trip through a model, and their costs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST

from quant import QuantConfig, quantize
from search.space import Candidate, SearchSpace, candidate_of


@pytest.fixture(scope="module")
def space(tiny_vit, images):
    return SearchSpace.from_model(quantize(tiny_vit, images, QuantConfig(**FAST)), images)


def test_candidate_json_and_stable_key():
    a = Candidate.make({"b.w": 4, "a.w": 6}, {"x.a_q": {"shift": 3}})
    b = Candidate.from_dict(json.loads(a.to_json()))
    assert a == b and a.key == b.key and len(a.key) == 16
    assert a.key == Candidate.make({"a.w": 6, "b.w": 4}, {"x.a_q": {"shift": 3}}).key
    assert a.key != Candidate.make({"a.w": 6, "b.w": 5}, {"x.a_q": {"shift": 3}}).key
    other = subprocess.run(  # the key is the same in another process (no hash seed in it)
        [sys.executable, "-c", "from search.space import Candidate; print(Candidate.make("
         "{'b.w': 4, 'a.w': 6}, {'x.a_q': {'shift': 3}}).key)"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert other.stdout.strip() == a.key
    with pytest.raises(ValueError, match="unknown candidate fields"):
        Candidate.from_dict({"bits": {}, "extra": 1})


def test_candidate_model_candidate_round_trip(tiny_vit, images):
    cand = Candidate.make(
        bits={"blocks.0.attn.qkv.weight_q": 4, "blocks.1.mlp.fc2.input_q": 5},
        pinned={"blocks.0.attn.a_q": {"shift": 2, "fine_share": 0.25},
                "blocks.1.mlp.fc2.input_q": {"shift": 3},
                "blocks.0.norm2.input_q": {"threshold": 2.0, "exponent": 2}})
    q = quantize(tiny_vit, images, cand.config(QuantConfig(**FAST)))
    back = candidate_of(q)
    assert dict(back.bits) == dict(cand.bits)
    for name, params in cand.pinned:
        got = dict(dict(back.pinned)[name])
        for k, v in params:
            if k == "exponent" and got[k] == 0:
                continue  # no channel passed the threshold: the exponent went unused
            assert got[k] == v, (name, k)


def test_costs(space):
    base = Candidate()
    assert space.mean_bits(base, weights=True) == pytest.approx(8)
    assert space.mean_bits(base, weights=False) == pytest.approx(8)
    qkv = "blocks.0.attn.qkv.weight_q"
    low = Candidate.make({qkv: 4})
    assert 7 < space.mean_bits(low, weights=True) < 8
    saved = space.slots[qkv].elements * 4 / 8
    assert space.weight_bytes(base) - space.weight_bytes(low) == pytest.approx(saved)
    assert space.bitops(low) < space.bitops(base)
    # elements per image: qkv's input is (tokens × dim) of one image
    assert space.slots["blocks.0.attn.qkv.input_q"].elements == 17 * 48  # 16 patches + class
    assert space.slots[qkv].elements == 48 * 144
    assert all(s.elements > 0 for s in space.slots.values())


def test_space_skips_disabled_quantizers(tiny_vit, images):
    q = quantize(tiny_vit, images, QuantConfig(setting="partial", **FAST))
    sp = SearchSpace.from_model(q, images)
    assert not any(s.kind == "ln_input" for s in sp.slots.values())
    assert torch.is_tensor(images)


def test_v2sf_operand_matmul_counts_twice(space):
    """A V-2SF operand is two integer matmuls (fine and coarse parts): twice its MACs."""
    a_q, v_q = "blocks.0.attn.a_q", "blocks.0.attn.v_q"
    assert space.slots[a_q].scheme == "v2sf" and space.slots[v_q].scheme != "v2sf"
    (macs,) = [m for a, b, m in space.macs if (a, b) == (a_q, v_q)]
    fc2 = [(a, b, m) for a, b, m in space.macs if b == "blocks.0.mlp.fc2.input_q"]
    assert fc2 and space.slots[fc2[0][1]].scheme == "v2sf"
    base, low = Candidate(), Candidate.make({a_q: 4})
    bits = space.bits_of(base)
    # lowering a_q from 8 to 4 bits saves exactly 2 × MACs × (8 − 4) × bits(v_q)
    saved = space.bitops(base) - space.bitops(low)
    assert saved == pytest.approx(2 * macs * (bits[a_q] - 4) * bits[v_q])
    # and the whole sum: uniform operands once, V-2SF operands twice
    expected = sum(m * (2 if "v2sf" in (space.slots[a].scheme, space.slots[b].scheme) else 1)
                   * bits[a] * bits[b] for a, b, m in space.macs)
    assert space.bitops(base) == pytest.approx(expected)
    one = SearchSpace(space.base, {a_q: space.slots[a_q]}, [(a_q, "fp", 10)])
    assert one.bitops(base) == 2 * 10 * bits[a_q] * 32


def test_module_overrides_group_a_candidates_changes_by_module():
    c = Candidate.make({"blocks.0.attn.qkv.weight_q": 4, "blocks.0.attn.qkv.input_q": 6,
                        "blocks.0.attn.a_q": 5}, {"blocks.0.attn.a_q": {"shift": 2}})
    assert c.module_overrides() == {
        ("blocks.0.attn.qkv", (("bits", "blocks.0.attn.qkv.input_q", 6),
                               ("bits", "blocks.0.attn.qkv.weight_q", 4))),
        ("blocks.0.attn", (("bits", "blocks.0.attn.a_q", 5),
                           ("pinned", "blocks.0.attn.a_q", (("shift", 2),))))}
    same_qkv = Candidate.make({"blocks.0.attn.qkv.weight_q": 4, "blocks.0.attn.qkv.input_q": 6})
    other_qkv = Candidate.make({"blocks.0.attn.qkv.weight_q": 4})
    assert c.module_overrides() & same_qkv.module_overrides()
    assert not c.module_overrides() & other_qkv.module_overrides()
