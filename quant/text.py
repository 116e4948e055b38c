"""Sentence embeddings of a text encoder, and how close a quantized encoder stays to FP32.

Embeddings are what sentence-transformers computes for all-MiniLM-L6-v2: the mean of the last
hidden states over the real (non-padding) tokens, L2-normalised. A text's nearest neighbour is
the other text of the set with the highest cosine similarity. Retrieval logits (the similarity
to every other text, times 20, the scale the model was trained with in sentence-transformers'
MultipleNegativesRankingLoss) make retrieval a classification over the other texts: its top-1
is the nearest neighbour, so the image metrics (top-1 agreement, KL) apply to text unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import take, to_device

RETRIEVAL_SCALE = 20.0
_EXCLUDED = -1e4  # a text's logit for itself: exp() underflows to 0, yet stays finite for KL


def last_hidden(out) -> Tensor:
    """The last hidden states of a Hugging Face model output (or a tuple, or a tensor)."""
    if torch.is_tensor(out):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """L2-normalised mean over the real tokens (``mask`` (N, L), 1 for real)."""
    if mask is None:
        pooled = hidden.mean(1)
    else:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def sentence_embeddings(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Embeddings of one batch (differentiable: the calibration loss reads them)."""
    return mean_pool(last_hidden(model(**batch)), batch.get("attention_mask"))


@torch.no_grad()
def embeddings_of(model: nn.Module, texts: Mapping[str, Tensor], batch: int = 64,
                  progress: Callable[[int], None] | None = None) -> Tensor:
    """Embeddings of every text, on the CPU in float32. Texts run in batches of one length, so
    no padding is computed: a text's embedding does not depend on the others (nor does an SQNR
    probe see padding). Only the token ids are held whole (~3 KB per 128-token text, against
    the ~600 KB of a 224² image, so texts need no stream); the model sees one batch at a time.
    ``progress`` gets the texts done."""
    dev = next(model.parameters()).device
    n, width = texts["input_ids"].shape
    mask = texts.get("attention_mask")
    lengths = mask.sum(1) if mask is not None else torch.full((n,), width)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(n, 0)
    start = 0
    while start < n:
        length = lengths[order[start]]
        stop = start + 1
        while stop < n and stop - start < batch and lengths[order[stop]] == length:
            stop += 1
        ids = order[start:stop]
        part = {k: v[ids] for k, v in texts.items()}
        emb = sentence_embeddings(model, to_device(take(part, 0, len(ids)), dev)).float().cpu()
        if out.shape[1] == 0:
            out = torch.empty(n, emb.shape[1])
        out[ids] = emb
        start = stop
        if progress is not None:
            progress(start)
    return out


def retrieval_logits(emb: Tensor, scale: float = RETRIEVAL_SCALE) -> Tensor:
    """(N, N): ``scale`` × cosine similarity to every other text; a text's own entry is
    excluded."""
    sim = emb @ emb.T * scale
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    return sim.masked_fill(eye, _EXCLUDED)


@dataclass(frozen=True)
class TextAgreement:
    cosine: float        # mean cosine similarity of each text's embedding to its FP32 one
    min_cosine: float
    nn_agreement: float  # share of texts whose nearest other text is FP32's
    kl: float            # mean KL(P_fp32 || P_quantized) of the retrieval distributions

    def to_dict(self) -> dict:
        """With the keys of an image result: FP32's own neighbours are the labels, so ``top1``
        and ``agreement`` are the nearest-neighbour agreement and ``fp32_top1`` is 1."""
        return {"top1": self.nn_agreement, "fp32_top1": 1.0, "agreement": self.nn_agreement,
                **asdict(self)}


def compare_embeddings(fp: Tensor, q: Tensor) -> TextAgreement:
    """How close the quantized embeddings ``q`` stay to the FP32 ones ``fp`` (same texts)."""
    cos = (fp.double() * q.double()).sum(-1) / (fp.double().norm(dim=-1)
                                                * q.double().norm(dim=-1)).clamp_min(1e-12)
    fl, ql = retrieval_logits(fp.float()), retrieval_logits(q.float())
    kl = F.kl_div(F.log_softmax(ql, -1), F.log_softmax(fl, -1), log_target=True,
                  reduction="batchmean")
    return TextAgreement(cosine=float(cos.mean()), min_cosine=float(cos.min()),
                         nn_agreement=float((fl.argmax(-1) == ql.argmax(-1)).float().mean()),
                         kl=float(kl))
