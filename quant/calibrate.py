"""Calibration: one statistics pass over the calibration images, then every quantizer's search."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantConfig
from .modules import Capture, QuantModule, QWeighted
from .quantizers import UniformQuantizer

Progress = Callable[[int, int, str], None]


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def collect_statistics(model: nn.Module, images: Tensor, config: QuantConfig) -> None:
    """Run the FP twin once, keeping what each module needs to score candidates. Under the
    Hessian-guided metric, also back-propagate the pseudo-label cross-entropy for the gradients."""
    capture = Capture(rows=config.search_rows, grads=config.metric == "hessian",
                      generator=torch.Generator().manual_seed(config.seed))
    modules = quant_modules(model)
    for _, m in modules:
        m.capture = capture
    try:
        if capture.grads:
            with torch.enable_grad():
                images = images.detach().clone().requires_grad_(True)
                logits = model(images)
                F.cross_entropy(logits, logits.detach().argmax(-1)).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(images)
    finally:
        for _, m in modules:
            m.capture = None


@torch.no_grad()
def calibrate_modules(model: nn.Module, config: QuantConfig,
                      progress: Progress | None = None, skip: frozenset[str] = frozenset()) -> None:
    modules = quant_modules(model)
    for i, (name, m) in enumerate(modules):
        if name not in skip:
            m.calibrate(config)
        if progress is not None:
            progress(i + 1, len(modules), name)


PARAM_QUANTIZERS = "tsptq_params"


def attach_param_quantizers(model: nn.Module, names: list[str], factory) -> None:
    """Quantizers for plain parameters that feed activations (position embeddings, class
    tokens); they live on the model so their state travels with its state dict."""
    qs = {}
    for name in names:
        p = model.get_parameter(name)
        qs[name.replace(".", "__")] = factory.embedding(p.shape[-1])
    model.add_module(PARAM_QUANTIZERS, nn.ModuleDict(qs))


def param_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    qs = getattr(model, PARAM_QUANTIZERS, None)
    return {} if qs is None else {k.replace("__", "."): q for k, q in qs.items()}


@torch.no_grad()
def calibrate_parameters(model: nn.Module, config: QuantConfig) -> None:
    """Quantize those parameters in place: the model then computes with their integer values."""
    for name, q in param_quantizers(model).items():
        if not q.enabled:
            continue
        p = model.get_parameter(name)
        dims = list(range(p.dim() - 1))
        q.calibrate(p.detach(), None, config.search_points,
                    channel_loss=lambda pq, p=p, dims=dims: ((pq - p) ** 2).sum(dims))
        p.copy_(q.fake_quant(p))


def integer_parameters(model: nn.Module) -> dict[str, tuple[str, UniformQuantizer]]:
    """Parameters that the quantized model holds as integer codes:
    parameter name -> (its quantizer's state-dict prefix, the quantizer)."""
    out = {f"{n}.weight": (f"{n}.weight_q", m.weight_q) for n, m in model.named_modules()
           if isinstance(m, QWeighted)}
    out.update({name: (f"{PARAM_QUANTIZERS}.{name.replace('.', '__')}", q)
                for name, q in param_quantizers(model).items()})
    return {k: v for k, v in out.items() if v[1].enabled}


@torch.no_grad()
def round_float_parameters(model: nn.Module) -> None:
    """Round the parameters that stay in floating point (biases, LayerNorm affine, Swin's
    relative position bias) to float16 precision, so checkpoints store them losslessly in half
    the bytes. Their relative change is below 2^-11: nothing measurable, where the int8 weights
    already carry ~2^-8."""
    coded = integer_parameters(model)
    for name, p in model.named_parameters():
        if name not in coded and p.is_floating_point():
            p.copy_(p.to(torch.float16).to(p.dtype))


def release_statistics(model: nn.Module) -> None:
    for _, m in quant_modules(model):
        m.release()


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes: names the calibration data in a checkpoint's recipe."""
    return hashlib.sha256(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()
