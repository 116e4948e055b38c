"""What every model family's adapter does, and the rewriting steps the families share."""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType

import timm
import torch
from timm.layers import DropPath, Mlp, PatchDropout
from timm.layers import LayerNorm as TimmLayerNorm
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
    gelu_pair,
)
from ..quantizers import Quantizer

# ``QuantConfig`` fields whose None means "the model family's choice".
CHOICE_FIELDS = ("post_ln_two_scale", "keep_bulk", "first_token_scale", "coarse_offset",
                 "weight_rounding")

# Plain LayerNorms (timm's subclass computes the same F.layer_norm).
_LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm)


class ModelAdapter(ABC):
    """Rewrites one model family into its fully quantized twin, and rebuilds its FP skeleton."""

    family: str
    # What ``QuantConfig``'s None fields mean for this family.
    post_ln_two_scale: bool = False
    keep_bulk: bool = False
    first_token_scale: bool = False
    coarse_offset: bool = False
    weight_rounding: str = "nearest"
    # The family's choices for one setting, over the ones above ({setting: {field: value}}).
    # Checkpoints record what their None fields were resolved to (``choices``); recipes from
    # before that record rebuild with the choices above alone (``legacy``), as they were made.
    setting_choices: dict[str, dict[str, object]] = {}
    # Whether token 0 of this family's sequences is a fixed special token (``first_token_scale``
    # may be asked for).
    fixed_first_token: bool = False
    # timm families: the class every model of the family derives from. A model built from its
    # class (not by ``timm.create_model``) is rebuilt from a subclass of it (``build_class``).
    timm_class: type | None = None

    @abstractmethod
    def matches(self, model: nn.Module) -> bool: ...

    def choices(self, config: QuantConfig, legacy: bool = False) -> dict[str, object]:
        """The family's values for ``config``'s None fields (``legacy``: without the
        per-setting ones, as recipes that do not record them were built)."""
        if config.first_token_scale and not self.fixed_first_token:
            raise ValueError(f"first_token_scale is not offered for the {self.family} family: "
                             "its token 0 is not a fixed special token")
        family = {name: getattr(self, name) for name in CHOICE_FIELDS}
        if not legacy:
            family.update(self.setting_choices.get(config.setting, {}))
        chosen = {name: v for name, v in family.items() if getattr(config, name) is None}
        if "first_token_scale" in chosen:  # like post_ln_two_scale, part of tsptq only
            chosen["first_token_scale"] &= config.method == "tsptq"
        if config.post_ln_reparam and chosen.get("post_ln_two_scale"):
            chosen["post_ln_two_scale"] = False  # the two are alternatives: the one asked for
        return chosen

    def resolve(self, config: QuantConfig, legacy: bool = False) -> QuantConfig:
        """``config`` with the family's choices in place of its None fields: what the rewrite
        and the calibration build from (the model keeps the config as given, and a checkpoint
        records the choices beside it)."""
        chosen = self.choices(config, legacy)
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
        if "class" in arch:  # built from its class (``class_architecture``)
            return build_class(arch, self.timm_class)
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

    def lower(self, model: nn.Module):
        """The integer program (``quant.integer.Program``) of the calibrated twin ``model``."""
        raise UnsupportedModelError(f"the integer setting is not offered for the {self.family} "
                                    "family yet")


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


def timm_model_name(model: nn.Module) -> str | None:
    """The name ``timm.create_model`` made ``model`` from; None for a model built from its
    class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or None


# ---------------------------------------------------------------- models built from their class
#
# Such a model's architecture is {"family", "class": "timm.<module>:<QualName>", "kwargs"}: the
# class and the constructor arguments that rebuild it. A recipe is untrusted input, so the class
# is looked up, never imported: only in timm modules already loaded, and only a subclass of the
# family's timm class.

_CLASS_SPEC = re.compile(r"timm(\.[A-Za-z_][A-Za-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_]*"
                         r"(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Modules that compute nothing at inference (their drop rates are not recorded), and attributes
# that do not change what the model computes.
_NO_INFERENCE = (nn.Dropout, DropPath, PatchDropout, nn.Identity)
_HARMLESS = frozenset({"training", "grad_checkpointing", "fused_attn", "weight_init_mode",
                       "fix_init", "distilled_training"})


def class_spec(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def timm_class(spec: object, base: type) -> type:
    """The class named ``spec`` ("module:QualName"): a subclass of ``base`` defined in a timm
    module that is already loaded. Nothing is imported, and no attribute hook runs."""
    if not isinstance(spec, str) or not _CLASS_SPEC.fullmatch(spec):
        raise UnsupportedModelError(
            f"model class {spec!r} is not a class of the timm package ('timm.<module>:<Class>')")
    module_name, qualname = spec.split(":")
    obj: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = vars(obj).get(part) if isinstance(obj, (ModuleType, type)) else None
    if not (isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module_name
            and obj.__qualname__ == qualname):
        raise UnsupportedModelError(
            f"model class {spec!r} is not a subclass of timm's {base.__name__} in a loaded "
            "timm module")
    return obj


def _from_json(value: object) -> object:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def _plain(value: object, mappings: bool = True) -> bool:
    """None, a number, a string, or sequences (and, with ``mappings``, dicts) of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v, mappings) for v in value)
    if mappings and isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio whose ``int(dim * ratio)`` (how timm sizes an Mlp) is ``hidden`` again."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else math.nextafter(ratio, math.inf)


def build_class(arch: dict, base: type | None) -> nn.Module:
    """The FP model of a class-built architecture (random weights)."""
    if base is None:
        raise UnsupportedModelError(f"the {arch.get('family')} family is not rebuilt by class")
    cls = timm_class(arch["class"], base)
    kwargs = arch["kwargs"]
    allowed = set(inspect.signature(base.__init__).parameters) - {"self", "device", "dtype"}
    if (not isinstance(kwargs, dict) or not set(kwargs) <= allowed
            or not all(_plain(v, mappings=False) for v in kwargs.values())):
        raise UnsupportedModelError(
            f"constructor arguments of {arch['class']} must be a mapping of plain values with "
            f"names among {base.__name__}'s arguments, got {str(kwargs)[:200]}")
    try:
        return cls(**{k: _from_json(v) for k, v in kwargs.items()})
    except Exception as e:  # timm asserts and raises many types on arguments it cannot take
        raise UnsupportedModelError(f"cannot build {arch['class']} from its recorded "
                                    f"arguments: {type(e).__name__}: {e}") from None


def _structure(model: nn.Module) -> tuple[dict, dict]:
    """What decides a model's computation at inference: each module's type and plain
    attributes (modules that compute nothing at inference left out), and every parameter's and
    buffer's shape."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, _NO_INFERENCE):
            continue
        attrs = {k: v for k, v in vars(m).items()
                 if not k.startswith("_") and k not in _HARMLESS and _plain(v)}
        # timm's LayerNorm computes torch's F.layer_norm (unless asked for its fast norm), and
        # both become the same QLayerNorm: ``partial(nn.LayerNorm, eps=1e-6)`` is timm's default.
        kind = (nn.LayerNorm if type(m) in _LAYER_NORMS and not getattr(m, "_fast_norm", False)
                else type(m))
        modules[name] = (kind, attrs)
    tensors = {n: tuple(t.shape) for n, t in [*model.named_parameters(),
                                              *model.named_buffers()]}
    return modules, tensors


def _names(have: type | None, want: type | None) -> tuple[str, str]:
    def name(t: type | None, qualified: bool) -> str:
        if t is None:
            return "absent"
        return f"{t.__module__}.{t.__qualname__}" if qualified else t.__name__

    same = have is not None and want is not None and have.__name__ == want.__name__
    return name(have, same), name(want, same)


def _first_difference(model: nn.Module, rebuilt: nn.Module) -> str | None:
    (mods, tensors), (want_mods, want_tensors) = _structure(model), _structure(rebuilt)
    for name in sorted(set(mods) | set(want_mods)):
        have_type, have = mods.get(name, (None, {}))
        want_type, want = want_mods.get(name, (None, {}))
        if have_type is not want_type:
            have_name, want_name = _names(have_type, want_type)
            return f"module {name!r} is {have_name}, rebuilt {want_name}"
        for k in sorted(want):  # attributes the user added are not the constructor's
            if have.get(k, "<absent>") != want[k]:
                return (f"{have_type.__name__} {name or '(model)'}.{k} is "
                        f"{have.get(k, '<absent>')!r}, rebuilt {want[k]!r}")
    for name in sorted(set(tensors) | set(want_tensors)):
        if tensors.get(name) != want_tensors.get(name):
            return (f"tensor {name!r} has shape {tensors.get(name)}, rebuilt "
                    f"{want_tensors.get(name)}")
    return None


def class_architecture(adapter: ModelAdapter, model: nn.Module, kwargs: dict) -> dict:
    """The architecture of a timm model built from its class: the class and ``kwargs``, the
    constructor arguments that rebuild it. Checked here, at quantization time, by rebuilding it
    (on the meta device): a model with layers no argument can name (a custom norm or
    activation layer, say) is refused now, not misbuilt when its checkpoint is loaded."""
    cls = type(model)
    try:
        timm_class(class_spec(cls), adapter.timm_class)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"{cls.__module__}.{cls.__qualname__} was not made by timm.create_model and is not "
            "one of timm's own classes, so it cannot be rebuilt from a checkpoint; create it "
            "with timm.create_model or from timm's class") from None
    # Through JSON, as a recipe holds it (tuples become lists): what ``build`` will be given.
    arch = json.loads(json.dumps({"family": adapter.family, "class": class_spec(cls),
                                  "kwargs": kwargs}))
    with torch.device("meta"):
        rebuilt = build_class(arch, adapter.timm_class)
    diff = _first_difference(model, rebuilt)
    if diff:
        raise UnsupportedModelError(
            f"{cls.__name__} was built from its class with arguments its architecture record "
            f"cannot reproduce ({diff}); build it with timm's default layers, or with "
            "timm.create_model")
    return arch


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
            gelu_pair(m.fc1, m.fc2)
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
