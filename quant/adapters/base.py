"""What every model family's adapter does, and the rewriting steps the families share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace

import timm
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from torch import Tensor, nn

from ..calibrate import pseudo_label_loss
from ..config import QuantConfig
from ..factory import QuantizerFactory
from ..inputs import Inputs
from ..modules import (
    QAttention,
    QConv2d,
    QLayerNorm,
    QLinear,
    QuantModule,
    UnsupportedModelError,
    first_token_input,
)
from ..quantizers import Quantizer

# Plain LayerNorms (timm's subclass computes the same F.layer_norm).
_LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm)


class ModelAdapter(ABC):
    """Rewrites one model family into its fully quantized twin, and rebuilds its FP skeleton."""

    family: str
    # What ``QuantConfig``'s None fields mean for this family.
    post_ln_two_scale: bool = False
    keep_bulk: bool = False
    first_token_scale: bool = False
    # Whether token 0 of this family's sequences is a fixed special token (``first_token_scale``
    # may be asked for).
    fixed_first_token: bool = False

    @abstractmethod
    def matches(self, model: nn.Module) -> bool: ...

    def resolve(self, config: QuantConfig) -> QuantConfig:
        """``config`` with the family's choices in place of its None fields: what the rewrite
        builds from (the model keeps the config as given, so a checkpoint's recipe does too)."""
        if config.first_token_scale and not self.fixed_first_token:
            raise ValueError(f"first_token_scale is not offered for the {self.family} family: "
                             "its token 0 is not a fixed special token")
        chosen = {name: getattr(self, name)
                  for name in ("post_ln_two_scale", "keep_bulk", "first_token_scale")
                  if getattr(config, name) is None}
        if "first_token_scale" in chosen:  # like post_ln_two_scale, part of tsptq only
            chosen["first_token_scale"] &= config.method == "tsptq"
        return replace(config, **chosen) if chosen else config

    @abstractmethod
    def rewrite(self, model: nn.Module, factory: QuantizerFactory) -> nn.Module: ...

    def reparameterize(self, model: nn.Module, run: Callable[[], object]) -> None:
        """Fold RepQ-ViT's post-LayerNorm scales into the FP ``model`` in place
        (``QuantConfig.post_ln_reparam``); ``run`` makes one FP pass on the calibration data."""
        raise ValueError(f"post_ln_reparam is not offered for the {self.family} family")

    @abstractmethod
    def architecture(self, model: nn.Module) -> dict:
        """JSON description from which ``build`` makes the same FP model (random weights)."""

    def build(self, arch: dict) -> nn.Module:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch["kwargs"].items()}
        return timm.create_model(arch["name"], pretrained=False, **kwargs)

    def check_inputs(self, inputs: Inputs) -> None:
        """Reject calibration inputs this family cannot take (default: an image batch)."""
        check_images(inputs)

    def task_loss(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """The loss whose gradients weight the Hessian-guided metric (METHOD.md section 3)."""
        return pseudo_label_loss(model, inputs)

    def versions(self) -> dict[str, str]:
        """Library versions worth recording in a checkpoint's recipe, beyond timm and torch."""
        return {}


def check_images(images: Tensor) -> None:
    if not torch.is_tensor(images):
        raise TypeError(f"calib_images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError("calib_images must be a float tensor of shape (N, C, H, W), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError("calib_images is empty")
    if not torch.isfinite(images).all():
        raise ValueError("calib_images contains NaN or infinite values")


def timm_architecture_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise UnsupportedModelError(
            f"{type(model).__name__} was not made by timm.create_model, so its architecture "
            "name is unknown; create it with timm.create_model")
    return name


def qlinear(linear: nn.Module, factory: QuantizerFactory, input_kind: str,
            post_ln: bool = False) -> QLinear:
    if type(linear) is not nn.Linear:
        raise UnsupportedModelError(f"no quantized twin for {type(linear).__name__}")

    def input_q() -> Quantizer:
        return factory.activation(input_kind, linear.in_features, post_ln=post_ln)

    return _with_first_token(QLinear(linear, input_q(), factory.weight(linear.out_features)),
                             factory, input_q)


def _with_first_token(module: QuantModule, factory: QuantizerFactory,
                      input_q: Callable[[], Quantizer]) -> QuantModule:
    """``module``, with its own input quantizer for token 0 when the config asks for it."""
    return first_token_input(module, input_q()) if factory.config.first_token_scale else module


def _replace_children(model: nn.Module, fn) -> None:
    """Replace each child for which ``fn`` returns a module, depth first, never descending
    into modules that are already quantized."""
    for name, child in list(model.named_children()):
        if isinstance(child, QuantModule):
            continue
        new = fn(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace_children(child, fn)


def rewrite_transformer(model: nn.Module, factory: QuantizerFactory,
                        attention: dict[type, type[QAttention]]) -> nn.Module:
    """Shared by the timm families: attention, MLPs, then every remaining Linear, LayerNorm and
    Conv2d. Whatever is left that computes on activations is an error, not a silent FP island."""

    def attn_or_mlp(m: nn.Module) -> nn.Module | None:
        if type(m) in attention:
            for part in ("q_norm", "k_norm", "norm"):
                if not isinstance(getattr(m, part, nn.Identity()), nn.Identity):
                    raise UnsupportedModelError(f"{type(m).__name__} with {part} is not supported")
            if getattr(m, "gate", None) is not None:
                raise UnsupportedModelError(f"gated {type(m).__name__} is not supported")
            return attention[type(m)](
                m, qlinear(m.qkv, factory, "linear_input", post_ln=True),
                qlinear(m.proj, factory, "linear_input"),
                factory.activation("qk"), factory.activation("qk"),
                factory.activation("value"), factory.activation("post_softmax"))
        if type(m) is Mlp:
            if not isinstance(m.act, nn.GELU) or not isinstance(m.norm, nn.Identity):
                raise UnsupportedModelError(
                    f"Mlp with {type(m.act).__name__} activation / {type(m.norm).__name__} norm")
            m.fc1 = qlinear(m.fc1, factory, "linear_input", post_ln=True)
            m.fc2 = qlinear(m.fc2, factory, "post_gelu")
            return m
        return None

    _replace_children(model, attn_or_mlp)
    _replace_children(model, lambda m: plain_twin(m, factory))
    check_fully_rewritten(model)
    return model


def plain_twin(m: nn.Module, factory: QuantizerFactory) -> nn.Module | None:
    """The quantized twin of a Linear, LayerNorm or Conv2d that no family-specific rule took
    (None for anything else)."""
    if type(m) is nn.Linear:
        return qlinear(m, factory, "linear_input")
    if type(m) in _LAYER_NORMS:
        if len(m.normalized_shape) != 1:
            raise UnsupportedModelError("LayerNorm over more than the last axis")

        def input_q() -> Quantizer:
            return factory.activation("ln_input", m.normalized_shape[0])

        return _with_first_token(QLayerNorm(m, input_q()), factory, input_q)
    if type(m) is nn.Conv2d:
        return QConv2d(m, factory.activation("image"), factory.weight(m.out_channels))
    return None


_FLOAT_COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.MultiheadAttention)


def check_fully_rewritten(model: nn.Module, containers: tuple[type, ...] = ()) -> None:
    """``containers``: classes that only hold quantized modules (named like an attention, but
    computing nothing themselves)."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantModule, *containers)):
            continue
        if isinstance(m, _FLOAT_COMPUTE) or "Attention" in type(m).__name__:
            raise UnsupportedModelError(
                f"layer {name!r} ({type(m).__name__}) has no quantized twin in this adapter")
