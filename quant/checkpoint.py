"""The quantized checkpoint: one safetensors file, never a pickle.

Integer weights are stored as their codes (uint8; two 4-bit codes to a byte at 4 bits or less);
every float tensor that is exactly representable in float16 (all scales, biases and LayerNorm
parameters, which calibration rounds to float16 precision) as float16; everything else as it is;
a JSON recipe and a sha256 digest of the tensors go in the metadata. Loading rebuilds the FP
skeleton from the recipe, rewrites it with the same config and loads the tensors, so the
reloaded model computes exactly what the calibrated one did.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import adapter_for_family
from .calibrate import integer_parameters
from .config import QuantConfig
from .factory import QuantizerFactory
from .model import QuantizedModel
from .modules import UnsupportedModelError

FORMAT = "tsptq.v1"
_CODES = ".codes"
_PACKED = ".codes4"


class CheckpointError(ValueError):
    """The file is not a readable, intact tsptq checkpoint."""


def _pack4(codes: Tensor) -> Tensor:
    flat = codes.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack4(packed: Tensor, numel: int) -> Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()
    return out[:numel].to(torch.int32)


def _digest(tensors: dict[str, Tensor], recipe: str) -> str:
    """sha256 over the recipe and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(recipe.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike,
                   metrics: dict | None = None) -> Path:
    """Write ``qmodel`` to ``path`` (a .safetensors file); ``metrics`` go into the recipe."""
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError("save_quantized takes the QuantizedModel that quantize() returned")
    state = {k: v.detach().cpu() for k, v in qmodel.model.state_dict().items()}
    shapes: dict[str, list[int]] = {}
    for key, (prefix, q) in integer_parameters(qmodel.model).items():
        w = state.pop(key)
        codes = q.codes(qmodel.model.get_parameter(key).detach()).cpu()
        bits = q.bits
        if bits <= 4:
            state[key + _PACKED] = _pack4(codes)
            shapes[key] = list(w.shape)
        elif bits <= 8:
            state[key + _CODES] = codes.to(torch.uint8)
        else:
            state[key + _CODES] = codes.to(torch.int32)
        if q.symmetric:  # fixed by the bit width: rebuilt, not stored
            state.pop(f"{prefix}.zero_point")
    for k, v in list(state.items()):
        if v.dtype == torch.float32 and torch.equal(v.to(torch.float16).to(v.dtype), v):
            state[k] = v.to(torch.float16)  # scales, biases, LayerNorm: float16-exact
    state = {k: v.contiguous() for k, v in state.items()}
    recipe = {
        "architecture": qmodel.architecture,
        "config": qmodel.config.to_dict(),
        "info": qmodel.info,
        "metrics": metrics or {},
        "packed_shapes": shapes,
    }
    recipe_json = json.dumps(recipe, sort_keys=True)
    meta = {"format": FORMAT, "recipe": recipe_json, "digest": _digest(state, recipe_json)}
    path = Path(path)
    save_file(state, str(path), metadata=meta)
    return path


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe of a checkpoint, after checking the file's integrity."""
    return _read(path)[1]


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tsptq checkpoint (metadata format is "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("digest") != _digest(tensors, meta.get("recipe", "")):
        raise CheckpointError(f"{path}: tensor digest mismatch: the file is corrupted")
    try:
        recipe = json.loads(meta["recipe"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable recipe: {e}") from None
    return tensors, recipe


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild the quantized model saved by ``save_quantized``."""
    tensors, recipe = _read(path)
    try:
        config = QuantConfig.from_dict(recipe["config"])
        arch = recipe["architecture"]
        adapter = adapter_for_family(arch["family"])
        twin = adapter.rewrite(adapter.build(arch), QuantizerFactory(config)).eval()
    except (KeyError, TypeError, ValueError, UnsupportedModelError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from its recipe: {e}") from None
    qmodel = QuantizedModel(twin, config, arch, recipe.get("info"))
    qmodel.metrics = recipe.get("metrics", {})
    expected = twin.state_dict()
    state: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k in expected and v.dtype == torch.float16 and expected[k].dtype != torch.float16:
            v = v.to(expected[k].dtype)
        state[k] = v
    for key, (prefix, q) in integer_parameters(twin).items():
        if q.symmetric:
            state[f"{prefix}.zero_point"] = expected[f"{prefix}.zero_point"]
        for buf in ("scale", "zero_point", "calibrated"):
            bkey = f"{prefix}.{buf}"
            if bkey not in state:
                raise CheckpointError(f"{path}: missing tensor {bkey}")
            setattr(q, buf, state[bkey].to(expected[bkey].dtype))
        if key + _PACKED in state:
            numel = expected[key].numel()
            codes = _unpack4(state.pop(key + _PACKED), numel).reshape(expected[key].shape)
        elif key + _CODES in state:
            codes = state.pop(key + _CODES).to(torch.int32)
        else:
            raise CheckpointError(f"{path}: missing integer codes of {key}")
        if tuple(codes.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(codes.shape)}, the recipe's "
                                  f"model wants {tuple(expected[key].shape)}")
        state[key] = q.dequantize(codes, expected[key])
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not match the recipe's model: {e}") from None
    return qmodel.to(device).eval()
