"""A small ViT trained on scikit-learn's bundled ``load_digits`` (METHOD.md section 6).

1,797 grey 8×8 digits, upsampled to 32×32 (nearest) and repeated to three channels; a fixed
stratified 80/20 split. Patches of 8×8 (2×2 original pixels, 16 tokens) and mean pooling: with
1×1-pixel patches or class-token pooling the ViT barely learns from 1,437 images. The trained
weights ship in ``weights/digits_vit.safetensors``; ``python -m quant.zoo.train_digits`` remakes
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

WEIGHTS = Path(__file__).with_name("weights") / "digits_vit.safetensors"
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of the pixel values scaled to [0, 1]
SPLIT_SEED = 0

ARCH = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=4,
            num_heads=4, mlp_ratio=4.0, qkv_bias=True, global_pool="avg")


@dataclass(frozen=True)
class DigitsSplit:
    x_train: Tensor  # (N, 3, 32, 32) normalised
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _to_images(flat) -> Tensor:
    x = torch.as_tensor(flat, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    return (x - DIGITS_MEAN) / DIGITS_STD


def load_digits_split() -> DigitsSplit:
    """The fixed stratified 80/20 split (1,437 train, 360 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2,
                                          stratify=d.target, random_state=SPLIT_SEED)
    return DigitsSplit(_to_images(xtr), torch.as_tensor(ytr), _to_images(xte), torch.as_tensor(yte))


def weights_path() -> Path:
    return WEIGHTS


@register_model
def digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm entry point: ``timm.create_model("digits_vit", pretrained=True)`` loads the bundled
    weights (from this repository, never from a hub)."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    args = {**ARCH, **{k: v for k, v in kwargs.items() if v is not None}}
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"architecture": "digits_vit", "num_classes": args["num_classes"],
                            "input_size": (3, 32, 32), "mean": (DIGITS_MEAN,) * 3,
                            "std": (DIGITS_STD,) * 3}
    if pretrained:
        if not WEIGHTS.is_file():
            raise FileNotFoundError(
                f"{WEIGHTS} is missing; remake it with `python -m quant.zoo.train_digits`")
        model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()
