"""The quantized checkpoint: one safetensors file, never a pickle.

The file holds a handful of flat tensors, one per storage type: ``pack.u8`` (integer weight codes,
two 4-bit codes to a byte at 4 bits or less), ``pack.i16`` / ``pack.i32`` (zero points, exponents,
shifts; codes above 8 bits), ``pack.f16`` (every float tensor exactly representable in float16:
all scales, biases and LayerNorm parameters, which calibration rounds to float16 precision) and
``pack.f32`` (the rest). Their layout is not stored: it is the state dict of the model that the
JSON recipe in the metadata rebuilds, in sorted key order, so a per-tensor header (which costs
more than the biases on a small model) is not needed; the few tensors that do not fit their
default type are listed in the recipe. A sha256 digest over the recipe and the packs detects any
corruption. Loading rebuilds the FP skeleton, rewrites it with the same config and fills it, so
the reloaded model computes exactly what the calibrated one did.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import adapter_for_family
from .adapters.base import CHOICE_FIELDS
from .calibrate import integer_parameters
from .config import QuantConfig
from .factory import QuantizerFactory, apply_overrides
from .model import QuantizedModel
from .modules import UnsupportedModelError
from .quantizers import Quantizer

FORMAT = "tsptq.v1"
PROGRAM = "program."  # tensor-name prefix of the integer program's constants
_DTYPES = {"u8": torch.uint8, "i16": torch.int16, "i32": torch.int32, "f16": torch.float16,
           "f32": torch.float32}


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


def _storage(key: str, value: Tensor, wide: set[str]) -> str:
    """Which pack a (non-code) tensor lives in."""
    if value.dtype == torch.bool:
        return "u8"
    if not value.is_floating_point():
        return "i32" if key in wide else "i16"
    return "f32" if key in wide else "f16"


def _needs_wide(v: Tensor) -> bool:
    """Does the tensor lose information in its default pack (int16 / float16)?"""
    if v.dtype == torch.bool or v.numel() == 0:
        return False
    if v.is_floating_point():
        return not torch.equal(v.to(torch.float16).to(v.dtype), v)
    return int(v.min()) < -(1 << 15) or int(v.max()) >= 1 << 15


def _code_pack(bits: int) -> tuple[str, int]:
    """(pack, stored elements per code) of a quantizer's integer codes."""
    if bits <= 4:
        return "u8", 2
    return ("u8", 1) if bits <= 8 else ("i32", 1)


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike,
                   metrics: dict | None = None) -> Path:
    """Write ``qmodel`` to ``path`` (a .safetensors file); ``metrics`` go into the recipe."""
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError("save_quantized takes the QuantizedModel that quantize() returned")
    model = qmodel.model
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and m.enabled and not bool(m.calibrated):
            raise ValueError(f"quantizer {name} was never calibrated")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    coded = integer_parameters(model)
    packs: dict[str, list[Tensor]] = defaultdict(list)
    wide: set[str] = set()
    for key in sorted(state):
        v = state[key]
        if key in coded:
            q = coded[key][1]
            codes = q.codes(model.get_parameter(key).detach()).cpu().flatten()
            pack, per = _code_pack(q.bits)
            packs[pack].append(_pack4(codes) if per == 2 else codes.to(_DTYPES[pack]))
            continue
        if key.endswith(".calibrated"):
            continue  # equals the quantizer's ``enabled``, which the recipe's config decides
        if _needs_wide(v):
            wide.add(key)
        pack = _storage(key, v, wide)
        packs[pack].append(v.to(_DTYPES[pack]).flatten())
    tensors = {f"pack.{k}": torch.cat(v).contiguous() for k, v in packs.items()}
    program_spec = None
    if qmodel.program is not None:  # the integer setting: its program, for the engine
        program_spec, consts = qmodel.program.to_state()
        tensors.update({f"{PROGRAM}{k}": v for k, v in consts.items()})
    recipe = {
        "architecture": qmodel.architecture,
        "config": qmodel.config.to_dict(),
        # what the config's None fields meant when it was built: a later default changes
        # nothing here
        "resolved": adapter_for_family(qmodel.architecture["family"]).choices(qmodel.config),
        "info": qmodel.info,
        "metrics": metrics or {},
        "wide": sorted(wide),
    }
    if program_spec is not None:
        recipe["program"] = program_spec
    recipe_json = json.dumps(recipe, sort_keys=True)
    meta = {"format": FORMAT, "recipe": recipe_json, "digest": _digest(tensors, recipe_json)}
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
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


def _program_of(path, tensors: dict[str, Tensor], recipe: dict):
    from .integer.program import Program

    spec = recipe.get("program")
    if spec is None:
        raise CheckpointError(f"{path}: an integer-setting checkpoint without its program")
    consts = {k[len(PROGRAM):]: v for k, v in tensors.items() if k.startswith(PROGRAM)}
    try:
        return Program.from_state(spec, consts)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable integer program: {e}") from None


def read_program(path: str | os.PathLike):
    """The integer program (``quant.integer.Program``) of a checkpoint, after checking the
    file's integrity: what the integer engine and the exporters read (no model is built)."""
    tensors, recipe = _read(path)
    if recipe.get("program") is None:
        raise CheckpointError(f"{path}: no integer program (quantize with "
                              "QuantConfig(setting='integer'))")
    return _program_of(path, tensors, recipe)


def _built_with(adapter, config: QuantConfig, recipe: dict) -> QuantConfig:
    """The config the twin was built from: its None fields as the recipe records them, or, in
    recipes from before that record, as the family chose then (without per-setting choices)."""
    recorded = recipe.get("resolved")
    if recorded is None:
        return adapter.resolve(config, legacy=True)
    if not isinstance(recorded, dict) or not set(recorded) <= set(CHOICE_FIELDS):
        raise ValueError(f"resolved choices {recorded!r}")
    built = replace(config, **{k: v for k, v in recorded.items() if getattr(config, k) is None})
    return adapter.resolve(built, legacy=True)  # a field a later version added, as it was


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild the quantized model saved by ``save_quantized``."""
    tensors, recipe = _read(path)
    packs = {k.removeprefix("pack."): v for k, v in tensors.items()
             if not k.startswith(PROGRAM)}
    if not set(packs) <= set(_DTYPES):
        raise CheckpointError(f"{path}: unexpected tensors {sorted(set(packs) - set(_DTYPES))}")
    try:
        # Recipes older than ``first_token_scale`` were built without first-token quantizers.
        config = QuantConfig.from_dict({"first_token_scale": False, **recipe["config"]})
        arch = recipe["architecture"]
        adapter = adapter_for_family(arch["family"])
        twin = adapter.rewrite(adapter.build(arch),
                               QuantizerFactory(_built_with(adapter, config, recipe))).eval()
        apply_overrides(twin, config)
        wide = set(recipe.get("wide", []))
    except (KeyError, TypeError, ValueError, UnsupportedModelError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from its recipe: {e}") from None
    expected = twin.state_dict()
    coded = integer_parameters(twin)
    cursor = dict.fromkeys(packs, 0)

    def take(pack: str, n: int) -> Tensor:
        start = cursor.get(pack, 0)
        if pack not in packs or start + n > packs[pack].numel():
            raise CheckpointError(f"{path}: its tensors do not match the recipe's model")
        cursor[pack] = start + n
        return packs[pack][start:start + n]

    state: dict[str, Tensor] = {}
    codes: dict[str, Tensor] = {}
    for key in sorted(expected):
        exp = expected[key]
        if key in coded:
            pack, per = _code_pack(coded[key][1].bits)
            raw = take(pack, math.ceil(exp.numel() / per))
            flat = _unpack4(raw, exp.numel()) if per == 2 else raw.to(torch.int32)
            codes[key] = flat.reshape(exp.shape)
        elif key.endswith(".calibrated"):
            owner = twin.get_submodule(key.rsplit(".", 1)[0])
            state[key] = torch.tensor(bool(owner.enabled))
        else:
            state[key] = take(_storage(key, exp, wide), exp.numel()).reshape(exp.shape).to(
                exp.dtype)
    if any(cursor[p] != packs[p].numel() for p in packs):
        raise CheckpointError(f"{path}: its tensors do not match the recipe's model")
    for key, (prefix, q) in coded.items():
        q.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items()
                           if k.startswith(prefix + ".")})
        state[key] = q.dequantize(codes[key], expected[key])
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not match the recipe's model: {e}") from None
    program = None
    if config.setting == "integer":
        program = _program_of(path, tensors, recipe)
    qmodel = QuantizedModel(twin, config, arch, recipe.get("info"), program)
    qmodel.metrics = recipe.get("metrics", {})
    return qmodel.to(device).eval()
