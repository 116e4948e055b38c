"""Model inputs: an image batch (a tensor) or a text batch (a mapping of token tensors).

Vision models take ``(N, C, H, W)`` images; Hugging Face encoders take ``input_ids``,
``attention_mask`` and ``token_type_ids`` as keyword arguments. These helpers let calibration,
evaluation and the search slice, move, count and run either kind alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

from .stream import ImageStream

Inputs = Union[Tensor, Mapping[str, Tensor]]  # noqa: UP007  (a runtime alias on Python 3.10)
# What evaluation reads: inputs in memory, or images streamed from a dataset in batches.
EvalInputs = Union[Inputs, ImageStream]  # noqa: UP007

# The keys a text batch may carry (what BERT-style encoders accept).
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def is_text(x: Inputs) -> bool:
    return isinstance(x, Mapping)


def count(x: Inputs) -> int:
    """Number of samples (images or texts); 0 for an empty mapping (no texts)."""
    if is_text(x):
        return int(x["input_ids"].shape[0]) if "input_ids" in x else 0
    return len(x) if isinstance(x, ImageStream) else int(x.shape[0])


def take(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop``; a text batch also loses the trailing padding columns that no
    text in the slice needs, so they are not computed."""
    if not is_text(x):
        return x[start:stop]
    part = {k: v[start:stop] for k, v in x.items()}
    mask = part.get("attention_mask")
    if mask is not None and mask.numel() and bool(mask.any()):
        width = int(torch.nonzero(mask.any(0)).max()) + 1
        part = {k: v[:, :width] for k, v in part.items()}
    return part


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    return {k: v.to(device) for k, v in x.items()} if is_text(x) else x.to(device)


def call(model: nn.Module, x: Inputs):
    """Run ``model`` on ``x``: tensors positionally, mappings as keyword arguments."""
    return model(**x) if is_text(x) else model(x)


def token_mask(x: Inputs) -> Tensor | None:
    """(N, L) bool mask of the real (non-padding) tokens of a text batch; None for images."""
    if not is_text(x):
        return None
    mask = x.get("attention_mask")
    ids = x["input_ids"]
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def check_text(x: Mapping[str, Tensor]) -> None:
    """A text batch: integer tensors of one (N, L) shape, ``input_ids`` required."""
    unknown = set(x) - set(TEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown text input keys {sorted(unknown)}; expected {TEXT_KEYS}")
    if "input_ids" not in x:
        raise ValueError("a text batch needs input_ids")
    shape = None
    for k, v in x.items():
        if not torch.is_tensor(v) or v.dim() != 2 or v.is_floating_point():
            raise ValueError(f"{k} must be an integer tensor of shape (N, L)")
        if shape is not None and v.shape != shape:
            raise ValueError(f"text inputs differ in shape: {k} is {tuple(v.shape)}, "
                             f"input_ids {tuple(shape)}")
        shape = v.shape
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError("the text batch is empty")
    mask = token_mask(x)
    if not bool(mask.any(1).all()):
        raise ValueError("every text needs at least one real token (attention_mask all zero)")


def digest(x: Inputs) -> str:
    """sha256 of the inputs: names the calibration data in a checkpoint's recipe."""
    if not is_text(x):  # unchanged for images, so their digests stay what they were
        return hashlib.sha256(x.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()
    h = hashlib.sha256()
    for k in sorted(x):
        h.update(k.encode())
        h.update(x[k].detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
