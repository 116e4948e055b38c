"""Calibration and evaluation data: the bundled digits, or an ImageFolder directory.

Calibration images are few (32 by default) and held as one tensor. An ImageFolder's test and
validation images are ``ImageStream``s, read in batches by DataLoader workers with the model's
own timm preprocessing, so an ImageNet-size directory is never held whole. Subsets
(``test_limit``, the validation draw) are seeded and class-stratified (``stratified_sample``);
the report names each sample by the sha256 of its ids (``EvalData.samples``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..stream import ImageStream, stratified_sample
from .digits import load_digits_split


@dataclass(frozen=True)
class EvalData:
    calib: Tensor      # (N, 3, H, W), normalised for the model
    x_test: Tensor | ImageStream
    y_test: Tensor
    calib_ids: list[int]  # indices of the calibration images in their source split
    # Held-out images for choosing between candidates: training images calibration did not
    # use (never the test split, which only reports accuracy). Empty unless asked for.
    x_val: Tensor | ImageStream = field(default_factory=lambda: torch.empty(0))
    test_ids: list[int] | None = None  # the test sample's indices in its split (None: all)
    val_ids: list[int] = field(default_factory=list)

    def samples(self) -> dict:
        """What each evaluation sample is, for the report: its size and the sha256 of its ids."""
        def named(ids: list[int] | None, n: int) -> dict:
            ids = list(range(n)) if ids is None else ids
            return {"images": n, "ids_sha256": hashlib.sha256(
                ",".join(map(str, ids)).encode()).hexdigest()}

        per_class = torch.bincount(self.y_test.to(torch.int64))
        per_class = per_class[per_class > 0]
        return {"test": {**named(self.test_ids, len(self.y_test)),
                         "subset": "all" if self.test_ids is None else "class-stratified",
                         "classes": len(per_class),
                         "per_class": [int(per_class.min()), int(per_class.max())]
                         if len(per_class) else [0, 0]},
                "validation": named(self.val_ids, len(self.val_ids))}


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


def digits_data(calib_size: int = 32, seed: int = 0, val_size: int = 0,
                test_limit: int | None = None) -> EvalData:
    """The bundled digits. Their validation draw stays a uniform seeded draw (the split is
    near-balanced, 143-146 images per class, so it is unbiased; every recorded search number
    was scored on it); ``test_limit`` takes a class-stratified sample of the test split."""
    split = load_digits_split()
    ids = pick_calibration(len(split.x_train), calib_size, seed)
    val = pick_validation(len(split.x_train), ids, val_size, seed)
    x_test, y_test, test_ids = split.x_test, split.y_test, None
    if test_limit is not None and test_limit < len(y_test):
        test_ids = stratified_sample(y_test, test_limit, seed)
        x_test, y_test = x_test[test_ids], y_test[test_ids]
    return EvalData(split.x_train[ids], x_test, y_test, ids, split.x_train[val], test_ids, val)


def image_folder_data(root: str | Path, model: nn.Module, calib_size: int = 32, seed: int = 0,
                      limit: int | None = None, val_size: int = 0,
                      workers: int = 2) -> EvalData:
    """``root/train`` (calibration, and ``val_size`` other images, class-stratified, that
    score search candidates) and ``root/val`` (evaluation; ``limit``: a class-stratified sample
    of it) in torchvision's ImageFolder layout, preprocessed with the model's own timm data
    config (as its weights expect). Test and validation images are streamed (``workers``
    DataLoader processes), never held whole."""
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
    test_labels = torch.tensor(val.targets)
    test_ids = None
    if limit is not None and limit < len(val):
        test_ids = stratified_sample(test_labels, limit, seed)
    picked = list(range(len(val))) if test_ids is None else test_ids
    x_test = ImageStream(val, tuple(picked), test_labels[picked], workers=workers)
    train_labels = torch.tensor(train.targets)
    held_out = stratified_sample(train_labels, val_size, seed + 1, exclude=ids) if val_size else []
    x_val = (ImageStream(train, tuple(held_out), train_labels[held_out], workers=workers)
             if held_out else torch.empty(0))
    return EvalData(calib, x_test, x_test.labels, ids, x_val, test_ids, held_out)
