"""One adapter per model family; ``find_adapter`` picks the one for a model."""

from __future__ import annotations

from torch import nn

from ..modules import UnsupportedModelError
from .base import ModelAdapter
from .hf_bert import HFBertAdapter
from .timm_swin import TimmSwinAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: list[ModelAdapter] = [TimmViTAdapter(), TimmSwinAdapter(), HFBertAdapter()]


def find_adapter(model: nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise UnsupportedModelError(
        f"unsupported architecture {type(model).__name__}: no adapter for it "
        f"(supported: {families})")


def adapter_for_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise UnsupportedModelError(f"unknown model family {family!r}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for_family", "find_adapter"]
