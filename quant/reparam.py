"""RepQ-ViT's scale reparameterization of post-LayerNorm activations, the peer METHOD.md section 1
asks the post-LayerNorm two-scale option (``QuantConfig.post_ln_two_scale``) to beat.

The inputs of qkv and fc1 are LayerNorm outputs y_c = γ_c·n_c + β_c whose channels have ranges
that differ widely. RepQ-ViT (Li et al., ICCV 2023) makes them fit one per-tensor quantizer by
folding a per-channel scale r_c and shift d_c into the LayerNorm's affine parameters and undoing
them in the consuming Linears' weights, so the FP function is unchanged:

    ỹ_c = y_c / r_c + d_c     (γ̃ = γ / r, β̃ = β / r + d)
    W·y + b = W̃·ỹ + b̃         (W̃ = W·diag(r), b̃ = b − W̃·d)

with r_c = range_c / mean(range) and d_c aligning every channel's centre. The weights then
carry the per-channel differences, under their per-output-channel quantizer.

Departure: RepQ-ViT derives r and d from the per-channel quantizer at the target width and
rounds d to whole zero-point steps, so the reparameterized per-tensor quantizer equals that
per-channel one. Here r and d come from the ranges alone (no width): the statistics pass, done
once, then serves every width a search tries, and the per-tensor quantizer's own search (scale
and zero point) runs on the reparameterized activations as for any other tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# (LayerNorm, the Linears that consume its output and nothing else)
PostLNPair = tuple[nn.LayerNorm, list[nn.Linear]]


@torch.no_grad()
def channel_ranges(norms: list[nn.LayerNorm], run: Callable[[], object]
                   ) -> list[tuple[Tensor, Tensor]]:
    """Per-channel (min, max) of each LayerNorm's output over one forward pass (``run``)."""
    seen: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for i, norm in enumerate(norms):
        def hook(_m, _args, out, i=i):
            y = out.detach().reshape(-1, out.shape[-1])
            lo, hi = y.amin(0), y.amax(0)
            if i in seen:
                lo, hi = torch.minimum(seen[i][0], lo), torch.maximum(seen[i][1], hi)
            seen[i] = (lo, hi)
        hooks.append(norm.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(norms))]


@torch.no_grad()
def fold_channel_scales(norm: nn.LayerNorm, linears: list[nn.Linear], lo: Tensor,
                        hi: Tensor) -> None:
    """Equalise the ranges of ``norm``'s output channels (given their min ``lo`` and max ``hi``)
    and centre them, compensating in ``linears``: the FP function does not change. A Linear
    without a bias cannot absorb the shift (adding one would change the architecture a
    checkpoint rebuilds), so then only the scales are folded."""
    if norm.weight is None or norm.bias is None:
        raise ValueError("reparameterization needs a LayerNorm with affine parameters")
    width = (hi - lo).clamp_min(1e-8)
    r = width / width.mean()
    d = (lo + hi).mean() / 2 - (lo + hi) / 2 / r  # every channel centred on the mean centre
    if any(lin.bias is None for lin in linears):
        d = torch.zeros_like(d)
    norm.weight.div_(r)
    norm.bias.div_(r).add_(d)
    for lin in linears:
        lin.weight.mul_(r)
        if lin.bias is not None:
            lin.bias.sub_(lin.weight @ d)


def reparameterize_post_ln(pairs: list[PostLNPair], run: Callable[[], object]) -> None:
    """Fold RepQ-ViT's scales into every pair, from the ranges one FP pass (``run``) shows."""
    ranges = channel_ranges([norm for norm, _ in pairs], run)
    for (norm, linears), (lo, hi) in zip(pairs, ranges, strict=True):
        fold_channel_scales(norm, linears, lo, hi)
