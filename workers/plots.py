"""PNG plots a person would rather look at than read: the Pareto front of a search, and, per
V-2SF and O-2SF quantizer, its activations with the split the calibration chose."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from quant import QuantizedModel
from quant.inputs import Inputs, call, to_device, token_mask
from quant.quantizers import ChannelPow2Quantizer, TwoScaleValueQuantizer


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_front(front: list[dict], path: Path) -> Path:
    plt = _pyplot()
    bits = [(p["weight_bits"] + p["activation_bits"]) / 2 for p in front]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bits, [max(p["kl"], 1e-12) for p in front], "o-")
    for b, p in zip(bits, front, strict=True):
        ax.annotate(f"{p['agreement']:.1%}", (b, max(p["kl"], 1e-12)), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("mean bits (weights and activations, element-weighted)")
    ax.set_ylabel("KL to FP32 on validation images (labels: top-1 agreement)")
    ax.set_yscale("log")
    ax.set_title("Pareto front: cost against accuracy")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _real(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` without its padding positions, as rows of its last dimension: token rows (N, L, C)
    keep the real tokens; attention maps (N, H, L, L) the real query-key pairs."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    if (mask is not None and x.dim() == 4 and x.shape[0] == mask.shape[0]
            and x.shape[2] == x.shape[3] == mask.shape[1]):
        pairs = mask[:, None, :, None] & mask[:, None, None, :]
        return x[pairs.expand_as(x)].reshape(-1, 1)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)


def _positions(qmodel: QuantizedModel, name: str, mask: Tensor | None) -> Tensor | None:
    """The part of ``mask`` a quantizer sees: a module with a first-token quantizer hands it
    token 0, and its input quantizer the other tokens."""
    owner_name, _, attr = name.rpartition(".")
    owner = qmodel.model.get_submodule(owner_name)
    if mask is None or getattr(owner, "first_q", None) is None:
        return mask
    return mask[:, :1] if attr == "first_q" else mask[:, 1:] if attr == "input_q" else mask


def _capture(qmodel: QuantizedModel, images: Inputs) -> dict[str, Tensor]:
    """The input of every enabled V-2SF/O-2SF quantizer on ``images`` (a bounded sample). For
    texts, padding positions are left out, as calibration leaves them out."""
    wanted = {n: q for n, q in qmodel.quantizers() if q.enabled and isinstance(
        q, TwoScaleValueQuantizer | ChannelPow2Quantizer)}
    mask = token_mask(images)
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, q in wanted.items():
        part = _positions(qmodel, name, mask)

        def hook(_m, args, name=name, part=part):
            seen[name] = _real(args[0].detach().float().cpu(), part)
        hooks.append(q.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call(qmodel, to_device(images, next(qmodel.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _v2sf(ax, name: str, q: TwoScaleValueQuantizer, x: Tensor) -> None:
    v = x.flatten()
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    ax.hist(v.numpy(), bins=200, log=True, color="tab:blue", alpha=0.8, histtype="stepfilled")
    tau = q.split_threshold
    top = float(q.scale) * 2 ** int(q.shift) * (q._coarse_start(int(q.shift),
                                                                int(q.zero_point)) + q.coarse_max)
    ax.axvline(tau, color="tab:red", label=f"split τ = {tau:.3g}")
    ax.axvline(top, color="tab:gray", ls="--", label=f"coarse top = {top:.3g}")
    ax.set_title(f"{name}  (V-2SF, {q.bits} bits, m = {int(q.shift)}, "
                 f"fine codes {int(q.fine_codes)}/{q.levels})", fontsize=8)
    ax.set_xlabel("activation value")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=7)


def _o2sf(ax, name: str, q: ChannelPow2Quantizer, x: Tensor) -> None:
    # Token 0's own quantizer (a module's ``first_q``) sees one row per text, nearly alike, so
    # its channels' spread says little (the embedding LayerNorm's is exactly zero): show max |x|.
    first = name.endswith(".first_q")
    half = (x.abs().amax(0) if first else (x.amax(0) - x.amin(0)) / 2).clamp_min(1e-8)
    outliers = q.exponent.cpu() > 0
    idx = torch.arange(half.numel())
    # One line collection per group: thousands of bar patches would be slow to draw.
    floor = float(half.min()) / 2  # a log axis: lines rise from below the smallest channel
    width = max(0.5, min(4.0, 300 / half.numel()))
    ax.vlines(idx[~outliers].numpy(), floor, half[~outliers].numpy(), color="tab:blue",
              lw=width, label="normal channels (s)")
    if outliers.any():
        k = int(q.exponent.max())
        ax.vlines(idx[outliers].numpy(), floor, half[outliers].numpy(), color="tab:red",
                  lw=width, label=f"outlier channels (2^{k}·s)")
    ax.set_ylim(bottom=floor)
    med = float(half.median())
    if q.chosen_threshold is not None and not first:  # T compares half ranges
        ax.axhline(q.chosen_threshold * med, color="black", ls="--",
                   label=f"T·median, T = {q.chosen_threshold:g}")
    ax.set_yscale("log")
    ax.set_title(f"{name}  (O-2SF, {q.bits} bits, {int(outliers.sum())} outliers of "
                 f"{half.numel()})", fontsize=8)
    ax.set_xlabel("channel")
    ax.set_ylabel("[CLS] max |x| (log)" if first else "channel half range (log)")
    ax.legend(fontsize=7)


def plot_histograms(qmodel: QuantizedModel, images: Inputs, folder: Path) -> list[Path]:
    """One PNG per V-2SF/O-2SF quantizer: post-Softmax/post-GELU value histograms with their
    split threshold, LayerNorm-input channel ranges with the outliers O-2SF flagged."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    quantizers = dict(qmodel.quantizers())
    paths = []
    for name, x in sorted(_capture(qmodel, images).items()):
        q = quantizers[name]
        if isinstance(q, ChannelPow2Quantizer) and q.rule != "o2sf":
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        fig.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=0.14)
        if isinstance(q, TwoScaleValueQuantizer):
            _v2sf(ax, name, q, x)
        else:
            _o2sf(ax, name, q, x)
        path = folder / f"hist_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
