"""Models and data this repository ships: the digits ViT (registered with timm as
``digits_vit``) and scikit-learn's bundled digits images."""

from .digits import (
           DIGITS_MEAN,
           DIGITS_STD,
           DigitsSplit,
           digits_vit,
           load_digits_split,
           weights_path,
)

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsSplit", "digits_vit", "load_digits_split",
           "weights_path"]
