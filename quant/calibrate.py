"""Calibration: one statistics pass over the calibration images, then every quantizer's search."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantConfig
from .inputs import Inputs, call, digest, token_mask
from .modules import Capture, QuantModule, QWeighted
from .quantizers import UniformQuantizer

Progress = Callable[[int, int, str], None]
# (model, calibration inputs) -> the scalar whose gradients weight the Hessian-guided metric.
TaskLoss = Callable[[nn.Module, Inputs], Tensor]


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def pseudo_label_loss(model: nn.Module, inputs: Inputs,
                      logits_of: Callable[[nn.Module, Inputs], Tensor] = call) -> Tensor:
    """Cross-entropy of the model's logits to its own top-1 (PTQ4ViT's task loss)."""
    logits = logits_of(model, inputs)
    return F.cross_entropy(logits, logits.detach().argmax(-1))


def collect_statistics(model: nn.Module, images: Inputs, config: QuantConfig,
                       task_loss: TaskLoss | None = None) -> None:
    """Run the FP twin once, keeping what each module needs to score candidates. Under the
    Hessian-guided metric, also back-propagate the task loss for the gradients: by default the
    pseudo-label cross-entropy (``pseudo_label_loss``); an adapter may give its family's own.
    Padding tokens of a text batch are left out of every statistic (``Capture.token_mask``)."""
    capture = Capture(rows=config.search_rows, grads=config.metric == "hessian",
                      input_hessian=config.weight_rounding == "gptq",
                      generator=torch.Generator().manual_seed(config.seed),
                      token_mask=token_mask(images))
    modules = quant_modules(model)
    for _, m in modules:
        m.capture = capture
    # Only the activations' gradients are wanted: with images as the graph's leaf, the
    # parameters' own gradients (half the backward pass's matmuls) are not computed. Token ids
    # cannot be a leaf: a text encoder's graph starts at its embedding tables.
    frozen = [p for p in model.parameters() if p.requires_grad] if (
        capture.grads and torch.is_tensor(images) and images.is_floating_point()) else []
    try:
        if capture.grads:
            for p in frozen:
                p.requires_grad_(False)
            with torch.enable_grad():
                if torch.is_tensor(images):
                    images = images.detach().clone().requires_grad_(True)
                (task_loss or pseudo_label_loss)(model, images).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                call(model, images)
    finally:
        for p in frozen:
            p.requires_grad_(True)
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


def attach_param_quantizers(model: nn.Module, names: list[str], factory,
                            axis: int = -1) -> None:
    """Quantizers for plain parameters that feed activations (position embeddings, class
    tokens, lookup tables); they live on the model so their state travels with its state dict.
    ``axis``: the parameters' axis that gets one scale per channel."""
    qs = {}
    for name in names:
        p = model.get_parameter(name)
        qs[name.replace(".", "__")] = factory.embedding(p.shape[axis], axis=axis)
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
        # Error per channel of the quantizer's axis (the last one for position embeddings and
        # tokens; the first, per row, for the lookup tables of text encoders).
        dims = [d for d in range(p.dim()) if d != q.axis % p.dim()]
        # A lookup table (axis 0: 8 bits, a scale per row) gains under 2% of its error from the
        # search (MiniLM's word embeddings: 1.887 against 1.919 at min-max, both 43 dB), which
        # costs 20 s on its 11.7M values: it takes the min-max scales.
        points = 1 if q.axis == 0 else config.search_points
        q.calibrate(p.detach(), None, points,
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
    return digest(t)
