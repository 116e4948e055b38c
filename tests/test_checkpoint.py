"""Quantized checkpoints: exact round trip, size, and refusal of bad files."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import timm
import torch
from conftest import FAST, VIT_KWARGS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant import (
    CheckpointError,
    QuantConfig,
    load_quantized,
    quantize,
    read_recipe,
    save_quantized,
)

CASES = [("vit", 8), ("vit", 4), ("swin", 8), ("deit", 8)]



def _config(bits: int) -> dict:
    return {"w_bits": bits, "a_bits": bits}


@pytest.fixture(scope="module")
def vit_ckpt(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vit8.safetensors"
    return save_quantized(quantized("vit"), path)


@pytest.mark.parametrize("name, bits", CASES)
def test_round_trip(quantized, images, tmp_path, name, bits):
    qmodel = quantized(name, **_config(bits))
    path = save_quantized(qmodel, tmp_path / "q.safetensors", metrics={"top1": 0.5})
    loaded = load_quantized(path)
    assert not any(m.training for m in loaded.model.modules())
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))
    assert loaded.config == qmodel.config
    assert loaded.architecture == qmodel.architecture
    assert loaded.info == qmodel.info
    assert loaded.metrics == {"top1": 0.5}
    # Saving the reloaded model writes the same tensors.
    again = save_quantized(loaded, tmp_path / "again.safetensors")
    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_stored_as_codes(quantized, tmp_path, bits):
    qmodel = quantized("vit", **_config(bits))
    tensors = load_file(str(save_quantized(qmodel, tmp_path / "q.safetensors")))
    assert set(tensors) <= {"pack.u8", "pack.i16", "pack.i32", "pack.f16", "pack.f32"}
    per_byte = 1 if bits == 8 else 2
    weights = [m.weight for _, m in qmodel.model.named_modules() if hasattr(m, "weight_q")]
    coded = sum(math.ceil(w.numel() / per_byte) for w in weights)
    embeddings = qmodel.model.pos_embed.numel() + qmodel.model.cls_token.numel()  # 8-bit always
    assert tensors["pack.u8"].numel() == coded + embeddings
    floats = sum(t.numel() for k, t in tensors.items() if k in ("pack.f16", "pack.f32"))
    assert floats < 0.1 * sum(w.numel() for w in weights)  # no float copy of any weight
    # float32 only for what float16 cannot hold exactly: here the near-zero class token's scales
    f32 = tensors.get("pack.f32", torch.empty(0))
    assert f32.numel() <= 0.05 * tensors["pack.f16"].numel()
    assert bool((f32.abs() < torch.finfo(torch.float16).tiny).all())


def test_read_recipe(quantized, vit_ckpt):
    qmodel = quantized("vit")
    recipe = read_recipe(vit_ckpt)
    assert recipe["config"] == qmodel.config.to_dict()
    assert recipe["architecture"] == qmodel.architecture
    assert recipe["architecture"]["family"] == "timm_vit"
    assert recipe["architecture"]["name"] == "vit_tiny_patch16_224"
    assert recipe["architecture"]["kwargs"]["embed_dim"] == 48
    assert recipe["info"]["calib_digest"] == qmodel.info["calib_digest"]


@pytest.mark.parametrize("name", ["vit", "deit", "swin"])
def test_size(models, quantized, tmp_path, name):
    fp = tmp_path / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in models[name].state_dict().items()}, str(fp))
    q8 = save_quantized(quantized(name), tmp_path / "q8.safetensors")
    assert os.path.getsize(q8) < 0.40 * os.path.getsize(fp)  # measured 0.345-0.354


def test_layer_scale_round_trip(images, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", init_values=1e-5, **VIT_KWARGS).eval()
    qmodel = quantize(model, images[:4], QuantConfig(**FAST))
    loaded = load_quantized(save_quantized(qmodel, tmp_path / "ls.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))


def test_save_needs_quantized_model(models, tmp_path):
    with pytest.raises(TypeError, match="QuantizedModel"):
        save_quantized(models["vit"], tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- bad files


def _both_refuse(path, match: str) -> None:
    for fn in (read_recipe, load_quantized):
        with pytest.raises(CheckpointError, match=match):
            fn(path)


def _copy_with(tmp_path, src, edit) -> str:
    data = bytearray(src.read_bytes())
    edit(data)
    dst = tmp_path / "bad.safetensors"
    dst.write_bytes(bytes(data))
    return dst


def _data_start(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_missing_file(tmp_path):
    _both_refuse(tmp_path / "nope.safetensors", "no such file")
    _both_refuse(tmp_path, "no such file")  # a directory


def test_truncated(vit_ckpt, tmp_path):
    def cut(d):
        del d[len(d) // 2:]

    _both_refuse(_copy_with(tmp_path, vit_ckpt, cut), "not a readable safetensors")


@pytest.mark.parametrize("where", ["near_end", "middle_of_data", "first_data_byte"])
def test_flipped_byte_in_tensor_data(vit_ckpt, tmp_path, where):
    def flip(d):
        start = _data_start(d)
        i = {"near_end": len(d) - 7, "middle_of_data": (start + len(d)) // 2,
             "first_data_byte": start}[where]
        d[i] ^= 0x01

    _both_refuse(_copy_with(tmp_path, vit_ckpt, flip), "digest mismatch")


def test_flipped_byte_in_recipe(vit_ckpt, tmp_path, images, quantized):
    def flip(d):
        i = d.index(b'\\"a_bits\\": 8') + len(b'\\"a_bits\\": ')
        d[i] = ord("9")

    bad = _copy_with(tmp_path, vit_ckpt, flip)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load_quantized(bad)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    _both_refuse(path, "not a tsptq checkpoint")
    save_file({"a": torch.zeros(3)}, str(path), metadata={"format": "other"})
    _both_refuse(path, "not a tsptq checkpoint")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    _both_refuse(path, "not a readable safetensors")
    path.write_bytes(b"")
    _both_refuse(path, "not a readable safetensors")


class _Trap:
    """Unpickling it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_refused_unread(tmp_path):
    marker = tmp_path / "unpickled.txt"
    path = tmp_path / "model.pt"
    torch.save({"state": _Trap(str(marker))}, path)
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(path.read_bytes())
    for p in (path, renamed):
        _both_refuse(p, "not a readable safetensors")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the trap is armed: unpickling springs it
    assert marker.exists()


def test_recipe_is_json(vit_ckpt):
    with safe_open(str(vit_ckpt), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "tsptq.v1"
    assert json.loads(meta["recipe"]) == read_recipe(vit_ckpt)


def _rewrite_recipe(path, out, change) -> None:
    """A copy of a checkpoint whose recipe ``change(recipe)`` edits, its digest made anew."""
    from quant.checkpoint import _digest

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["recipe"])
    change(recipe)
    meta["recipe"] = json.dumps(recipe)
    meta["digest"] = _digest(tensors, meta["recipe"])
    save_file(tensors, str(out), metadata=meta)


def test_partial_defaults_are_the_family_choice_and_recorded(quantized, images, tmp_path):
    """timm ViTs in the partial setting default to O-2SF on the qkv/fc1 inputs and GPTQ (the
    validation choice), the same calibration as asking for both; the checkpoint records what
    the None fields meant, so a later default cannot change what it rebuilds."""
    from quant.quantizers import ChannelPow2Quantizer

    default = quantized("vit", setting="partial")
    asked = quantized("vit", setting="partial", post_ln_two_scale=True, weight_rounding="gptq")
    assert default.config.weight_rounding is None and default.config.post_ln_two_scale is None
    assert isinstance(default.model.blocks[0].attn.qkv.input_q, ChannelPow2Quantizer)
    sd, sa = default.model.state_dict(), asked.model.state_dict()
    assert sd.keys() == sa.keys() and all(torch.equal(sd[k], sa[k]) for k in sd)
    path = save_quantized(default, tmp_path / "partial.safetensors")
    resolved = read_recipe(path)["resolved"]
    assert resolved["post_ln_two_scale"] is True and resolved["weight_rounding"] == "gptq"
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(images), default(images))
    full = quantized("vit")  # the full setting keeps per-tensor post-LN inputs, nearest rounding
    assert not isinstance(full.model.blocks[0].attn.qkv.input_q, ChannelPow2Quantizer)
    full_path = save_quantized(full, tmp_path / "full.safetensors")
    assert read_recipe(full_path)["resolved"]["weight_rounding"] == "nearest"


def test_recipe_from_before_recorded_choices_rebuilds_as_it_was_built(quantized, images,
                                                                      tmp_path):
    """A partial-setting checkpoint written before recipes recorded their choices was built
    with per-tensor post-LN inputs and stores ``post_ln_two_scale: null``: it rebuilds so."""
    old_made = quantized("vit", setting="partial", post_ln_two_scale=False,
                         weight_rounding="nearest")
    path = save_quantized(old_made, tmp_path / "made.safetensors")

    def as_before(recipe):
        recipe["config"]["post_ln_two_scale"] = None
        del recipe["resolved"]

    _rewrite_recipe(path, tmp_path / "old.safetensors", as_before)
    again = load_quantized(tmp_path / "old.safetensors")
    with torch.no_grad():
        assert torch.equal(again(images), old_made(images))

    def bad(recipe):
        recipe["resolved"] = {"warp_factor": 9}

    _rewrite_recipe(path, tmp_path / "bad.safetensors", bad)
    with pytest.raises(CheckpointError, match="resolved"):
        load_quantized(tmp_path / "bad.safetensors")
