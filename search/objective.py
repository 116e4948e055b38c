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
        self._calibrated: tuple[str, nn.Module] | None = None

    def __call__(self, candidate: Candidate) -> Score:
        self.calibrate(candidate)
        return self.measure(candidate)

    def calibrate(self, candidate: Candidate) -> None:
        """The first half of a score, the module searches: a Ray worker reports them before it
        measures, so the other workers' next tasks can skip them."""
        self._calibrated = None
        qmodel = self.calibrator.calibrate(candidate.config(self.base), incremental=True,
                                           copy_model=False)
        self._calibrated = candidate.key, qmodel

    def measure(self, candidate: Candidate) -> Score:
        """The second half: ``candidate`` must be the one calibrated last (the twin is live)."""
        if self._calibrated is None or self._calibrated[0] != candidate.key:
            raise RuntimeError(f"candidate {candidate.key} is not the one calibrated last")
        res = compare(self.fp_logits, logits_of(self._calibrated[1], self.val_images),
                      self.fp_logits.argmax(-1))
        self.evaluations += 1
        return Score(kl=res.kl, agreement=res.agreement)
