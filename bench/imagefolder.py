"""A generated ImageFolder (ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg) for real-size runs.

No ImageNet can be downloaded here, so benchmarks and tests write their own: each class is a
smooth colour pattern of its own with per-image noise, as JPEG (what ImageNet holds), so decoding
and timm's preprocessing cost what they cost on real data. Labels carry no learnable meaning for
random-weight models; what is measured is time, memory and the data path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FolderSpec:
    classes: int = 100
    train_per_class: int = 4
    val_per_class: int = 100
    size: int = 224
    seed: int = 0

    @property
    def images(self) -> int:
        return self.classes * (self.train_per_class + self.val_per_class)


def write_image_folder(root: str | Path, spec: FolderSpec = FolderSpec()) -> Path:
    """Write ``spec``'s images under ``root`` (once: a root that holds a ``.complete`` marker
    for the same spec is reused) and return it."""
    from PIL import Image

    root = Path(root)
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == repr(spec):
        return root
    rng = np.random.default_rng(spec.seed)
    yy, xx = np.mgrid[0:spec.size, 0:spec.size] / spec.size
    for c in range(spec.classes):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        colour = rng.uniform(40, 215, 3)
        pattern = (np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None] * 40 + colour)
        for part, n in (("train", spec.train_per_class), ("val", spec.val_per_class)):
            folder = root / part / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 12, pattern.shape)
                arr = np.clip(pattern + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    marker.write_text(repr(spec))
    return root
