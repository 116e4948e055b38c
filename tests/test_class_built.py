"""timm models built from their class (not by ``timm.create_model``): quantized, saved and
reloaded exactly; a recipe naming any other class is refused without importing anything."""

from __future__ import annotations

import json
import sys
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from quant import (
    CheckpointError,
    QuantConfig,
    UnsupportedModelError,
    load_quantized,
    quantize,
    read_recipe,
    save_quantized,
)
from quant.checkpoint import _digest

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1),
            num_heads=(2, 2), num_classes=10)
BUILDERS = {
    "vit": (VisionTransformer, VIT, "timm.models.vision_transformer:VisionTransformer"),
    "deit": (VisionTransformerDistilled, VIT, "timm.models.deit:VisionTransformerDistilled"),
    "swin": (SwinTransformer, SWIN, "timm.models.swin_transformer:SwinTransformer"),
}
FAST = dict(calib_size=8, search_points=8, search_rows=256)


def _build(name: str) -> nn.Module:
    cls, kwargs, _ = BUILDERS[name]
    torch.manual_seed(0)
    return cls(**kwargs).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


ROUND_TRIPS = [(name, setting) for name in BUILDERS
               for setting in ("full", "partial", "integer")]


@pytest.mark.parametrize("name, setting", ROUND_TRIPS)
def test_round_trip(calib, probe, tmp_path, name, setting):
    model = _build(name)
    assert not getattr(model, "pretrained_cfg", None)  # nothing names it to timm
    qmodel = quantize(model, calib, QuantConfig(method="tsptq", setting=setting, **FAST))
    arch = qmodel.architecture
    assert arch["family"] == ("timm_swin" if name == "swin" else "timm_vit")
    assert arch["class"] == BUILDERS[name][2] and "name" not in arch
    assert json.loads(json.dumps(arch)) == arch
    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    assert read_recipe(path)["architecture"] == arch
    loaded = load_quantized(path)
    assert type(loaded.model) is BUILDERS[name][0]
    with torch.no_grad():
        assert torch.equal(loaded(probe), qmodel(probe))
    assert loaded.architecture == arch


def test_deit_style_layer_norm(calib, probe, tmp_path):
    """DeiT's own code builds its ViT with ``partial(nn.LayerNorm, eps=1e-6)``: timm's default
    norm, computed alike."""
    torch.manual_seed(0)
    model = VisionTransformer(**VIT, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    qmodel = quantize(model, calib, QuantConfig(**FAST))
    loaded = load_quantized(save_quantized(qmodel, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(probe), qmodel(probe))


@pytest.mark.parametrize("make, match", [
    # torch's LayerNorm defaults to eps 1e-5; no constructor argument records it.
    (lambda: VisionTransformer(**VIT, norm_layer=nn.LayerNorm), "eps is 1e-05, rebuilt 1e-06"),
    (lambda: type("MyViT", (VisionTransformer,), {})(**VIT), "not one of timm's own classes"),
])
def test_unreproducible_model_refused(calib, make, match):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match=match):
        quantize(make().eval(), calib, QuantConfig(**FAST))


@pytest.fixture(scope="module")
def vit_ckpt(calib, tmp_path_factory):
    qmodel = quantize(_build("vit"), calib, QuantConfig(**FAST))
    return save_quantized(qmodel, tmp_path_factory.mktemp("ckpt") / "vit.safetensors")


def _edited(src, dst, edit):
    """A copy of checkpoint ``src`` with ``edit`` applied to its recipe's architecture, and a
    digest that matches (what a crafted file would carry)."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["recipe"])
    edit(recipe["architecture"])
    recipe_json = json.dumps(recipe, sort_keys=True)
    save_file(tensors, str(dst), metadata={**meta, "recipe": recipe_json,
                                           "digest": _digest(tensors, recipe_json)})
    return dst


@pytest.mark.parametrize("spec, match", [
    ("os:system", "not a class of the timm package"),
    ("collections:OrderedDict", "not a class of the timm package"),
    ("builtins:eval", "not a class of the timm package"),
    ("timm.models.vision_transformer:os.system", "not a subclass of timm's VisionTransformer"),
    ("timm.models.vision_transformer:Block", "not a subclass of timm's VisionTransformer"),
    ("timm.models.swin_transformer:SwinTransformer", "not a subclass of timm's VisionTransformer"),
    ("timm.tsptq_not_a_module:VisionTransformer", "not a subclass of timm's VisionTransformer"),
    ("timm.models.vision_transformer:VisionTransformer; import os", "not a class of the timm"),
    (["timm.models.vision_transformer:VisionTransformer"], "not a class of the timm package"),
])
def test_foreign_class_refused(vit_ckpt, tmp_path, spec, match):
    modules = set(sys.modules)
    bad = _edited(vit_ckpt, tmp_path / "bad.safetensors", lambda a: a.update({"class": spec}))
    assert read_recipe(bad)["architecture"]["class"] == spec  # intact: only the class is wrong
    with pytest.raises(CheckpointError, match=f"cannot rebuild the model.*{match}"):
        load_quantized(bad)
    assert set(sys.modules) == modules  # nothing was imported


@pytest.mark.parametrize("extra, match", [
    ({"block_fn": "os.system"}, "cannot build .*VisionTransformer.*TypeError"),
    ({"not_an_argument": 1}, "names among VisionTransformer's arguments"),
    ({"embed_dim": {"__class__": "os:system"}}, "mapping of plain values"),
])
def test_bad_constructor_arguments_refused(vit_ckpt, tmp_path, extra, match):
    bad = _edited(vit_ckpt, tmp_path / "bad.safetensors", lambda a: a["kwargs"].update(extra))
    with pytest.raises(CheckpointError, match=f"cannot rebuild the model.*{match}"):
        load_quantized(bad)
