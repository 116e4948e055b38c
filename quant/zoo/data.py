"""Calibration and evaluation data: the bundled digits, or an ImageFolder directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .digits import load_digits_split


@dataclass(frozen=True)
class EvalData:
    calib: Tensor      # (N, 3, H, W), normalised for the model
    x_test: Tensor
    y_test: Tensor
    calib_ids: list[int]  # indices of the calibration images in their source split
    # Held-out images for choosing between candidates: training images calibration did not
    # use (never the test split, which only reports accuracy). Empty unless asked for.
    x_val: Tensor = field(default_factory=lambda: torch.empty(0))


def pick_calibration(n_total: int, n: int, seed: int) -> list[int]:
    """A fixed random choice of calibration images for a seed."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[: min(n, n_total)].tolist())


def pick_validation(n_total: int, calib_ids: list[int], n: int, seed: int) -> list[int]:
    """A fixed random choice of ``n`` images outside the calibration set."""
    taken = set(calib_ids)
    rest = [i for i in range(n_total) if i not in taken]
    g = torch.Generator().manual_seed(seed + 1)
    return sorted(rest[i] for i in torch.randperm(len(rest), generator=g)[: min(n, len(rest))])


def digits_data(calib_size: int = 32, seed: int = 0, val_size: int = 0) -> EvalData:
    split = load_digits_split()
    ids = pick_calibration(len(split.x_train), calib_size, seed)
    val = pick_validation(len(split.x_train), ids, val_size, seed)
    return EvalData(split.x_train[ids], split.x_test, split.y_test, ids, split.x_train[val])


def image_folder_data(root: str | Path, model: nn.Module, calib_size: int = 32, seed: int = 0,
                      limit: int | None = None, val_size: int = 0) -> EvalData:
    """``root/train`` (calibration, and ``val_size`` other images that score search
    candidates) and ``root/val`` (evaluation) in torchvision's ImageFolder layout, preprocessed
    with the model's own timm data config (as its weights expect)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root / part} is not a directory (expected ImageFolder "
                                    "layout: ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg)")
    cfg = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the size the model was built for, not its pretrained default
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    transform = create_transform(**cfg, is_training=False)
    train = ImageFolder(str(root / "train"), transform=transform)
    val = ImageFolder(str(root / "val"), transform=transform)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{root}: no images found")
    ids = pick_calibration(len(train), calib_size, seed)
    calib = torch.stack([train[i][0] for i in ids])
    n_val = len(val) if limit is None else min(limit, len(val))
    xs, ys = zip(*(val[i] for i in range(n_val)), strict=True)
    held_out = pick_validation(len(train), ids, val_size, seed)
    x_val = torch.stack([train[i][0] for i in held_out]) if held_out else torch.empty(0)
    return EvalData(calib, torch.stack(xs), torch.tensor(ys), ids, x_val)
