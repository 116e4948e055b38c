"""Scoring a candidate: calibrate it from the shared statistics, compare with FP32 on held-out
images (never the test split that reports accuracy)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from quant import Calibrator, QuantConfig
from quant.evaluate import compare, logits_of
from quant.stream import ImageStream

from .space import Candidate


@dataclass(frozen=True)
class Score:
    kl: float          # mean KL(P_fp32 || P_candidate) on the validation images: the loss
    agreement: float   # share of validation images whose top-1 equals FP32's


class Objective:
    """``objective(candidate) -> Score``, recalibrating only what the candidate changes."""

    def __init__(self, model: nn.Module, calibrator: Calibrator, val_images: Tensor | ImageStream,
                 base: QuantConfig) -> None:
        self.calibrator, self.val_images, self.base = calibrator, val_images, base
        self.fp_logits = logits_of(model, val_images)
        self.evaluations = 0

    def __call__(self, candidate: Candidate) -> Score:
        qmodel = self.calibrator.calibrate(candidate.config(self.base), incremental=True,
                                           copy_model=False)
        res = compare(self.fp_logits, logits_of(qmodel, self.val_images),
                      self.fp_logits.argmax(-1))
        self.evaluations += 1
        return Score(kl=res.kl, agreement=res.agreement)
