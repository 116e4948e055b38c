"""Accuracy of a quantized model against its FP32 original."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import EvalInputs, is_text
from .stream import ImageStream, stream_logits
from .text import embeddings_of, retrieval_logits


@dataclass(frozen=True)
class Agreement:
    top1: float        # fraction correct
    fp32_top1: float
    agreement: float   # fraction of images whose top-1 equals the FP32 model's
    kl: float          # mean KL(P_fp32 || P_quantized) of the softmax outputs

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def logits_of(model: nn.Module, x: EvalInputs, batch: int = 256,
              progress: Callable[[int], None] | None = None) -> Tensor:
    """Logits of every image (a tensor, or an ``ImageStream`` read batch by batch; ``progress``
    gets the images done); for a text encoder (``x`` a mapping of token tensors), the
    retrieval logits of the texts among themselves (``quant.text``), whose top-1 is each text's
    nearest neighbour, so ``compare`` with FP32's own top-1 as labels measures text too."""
    if is_text(x):
        return retrieval_logits(embeddings_of(model, x))
    dev = next(model.parameters()).device
    if isinstance(x, ImageStream):
        return stream_logits(model, x, dev, progress)  # in the stream's own batches
    out = []
    for i in range(0, len(x), batch):
        out.append(model(x[i:i + batch].to(dev)).float().cpu())
        if progress is not None:
            progress(min(i + batch, len(x)))
    return torch.cat(out)


def compare(fp_logits: Tensor, q_logits: Tensor, labels: Tensor) -> Agreement:
    fp_pred, q_pred = fp_logits.argmax(-1), q_logits.argmax(-1)
    kl = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(fp_logits, -1), log_target=True,
                  reduction="batchmean")
    return Agreement(
        top1=float((q_pred == labels).float().mean()),
        fp32_top1=float((fp_pred == labels).float().mean()),
        agreement=float((q_pred == fp_pred).float().mean()),
        kl=float(kl),
    )
