"""One quantization job from start to artifacts: load the model and data once, collect the
calibration statistics once, search (candidates scored on Ray actors that share them), then build
the best candidate's checkpoint, report and plots.

Used by the service's dispatcher and by ``python -m search.run``; it knows nothing of either
(no database, no HTTP): progress, each finished candidate and cancellation go through
``JobHooks``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from export import ExportError, default_form, export_onnx
from quant import Calibrator, QuantConfig, read_recipe, save_quantized
from quant.evaluate import compare, logits_of
from quant.inputs import count, is_text
from quant.text import compare_embeddings, embeddings_of
from quant.zoo.data import EvalData, digits_data, image_folder_data
from quant.zoo.models import TEXT_MODELS, load_model
from quant.zoo.text import TextData, text_data
from search.objective import Objective, Score
from search.space import Candidate, SearchSpace
from search.strategies import (
    SINGLE,
    Budget,
    EvolutionSettings,
    SearchCancelled,
    SearchResult,
    SearchRun,
    StopCriteria,
    evolutionary_search,
    greedy_mixed_precision,
    threshold_search,
)

from .onnx_eval import MEDIA_TYPE as ONNX_MEDIA_TYPE
from .onnx_eval import evaluate_onnx
from .onnx_eval import unavailable as onnx_unavailable
from .plots import plot_front, plot_histograms

STRATEGIES = ("none", "greedy", "thresholds", "evolutionary")


@dataclass(frozen=True)
class JobInputs:
    model: str = "digits_vit"
    weights: str | Path = "pretrained"  # "pretrained", "random", or a local weights file
    # "digits", or an ImageFolder root (train/, val/); for a text model ("minilm") "digits" and
    # "stdlib" both mean the standard library's docstrings (quant.zoo.text)
    data: str | Path = "digits"
    calib_size: int = 32
    val_size: int = 256
    test_limit: int | None = None
    config: QuantConfig = QuantConfig()
    strategy: str = "none"
    budget: Budget = Budget()
    stop: StopCriteria = StopCriteria()
    evolution: EvolutionSettings = EvolutionSettings()
    workers: int = 2
    plots: bool = True  # the PNG plots (histograms, Pareto front); False skips them
    onnx_operands: str = "u8u8"  # the fast graph's int8 storage (export.OPERANDS)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")


@dataclass
class JobHooks:
    """``progress(done, total, stage)``; ``on_scored(seq, candidate, score, costs)``; ``known``:
    key → score of candidates an earlier run of this job already measured (not recomputed);
    ``cancelled()``: polled while the search runs."""

    progress: Callable[[int, int, str], None] | None = None
    on_scored: Callable[[int, Candidate, Score, dict], None] | None = None
    known: dict[str, Score] = field(default_factory=dict)
    cancelled: Callable[[], bool] | None = None


@dataclass
class JobOutput:
    result: dict
    timings: dict
    # (kind, path, media type): the checkpoint, report.json, the ONNX model (the integer
    # setting) and the PNG plots.
    files: list[tuple[str, Path, str]]


def load_data(inputs: JobInputs, model: torch.nn.Module) -> EvalData | TextData:
    seed = inputs.config.seed
    if inputs.model in TEXT_MODELS:
        if str(inputs.data) not in ("digits", "stdlib"):
            raise ValueError(f"{inputs.model} is a text encoder: its data is the standard "
                             "library's docstrings (\"stdlib\"), not an image folder")
        return text_data(inputs.calib_size, seed, val_size=inputs.val_size,
                         test_limit=inputs.test_limit)
    if str(inputs.data) == "digits":
        return digits_data(inputs.calib_size, seed, val_size=inputs.val_size,
                           test_limit=inputs.test_limit)
    return image_folder_data(inputs.data, model, inputs.calib_size, seed,
                             limit=inputs.test_limit, val_size=inputs.val_size)


def _versions(inputs_are_text: bool = False) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import timm

    extra = {}
    if inputs_are_text:
        import transformers

        extra["transformers"] = transformers.__version__
    try:
        tsptq_version = version("tsptq")
    except PackageNotFoundError:
        tsptq_version = "unknown"
    return {"tsptq": tsptq_version, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), **extra}


def _search(inputs: JobInputs, run: SearchRun) -> SearchResult:
    if inputs.strategy == "greedy":
        return greedy_mixed_precision(run)
    if inputs.strategy == "thresholds":
        return threshold_search(run)
    if inputs.strategy == "evolutionary":
        return evolutionary_search(run, inputs.evolution)
    run.expect(1)
    run.evaluate([Candidate.make()])
    return run.result(stopped_by=SINGLE)


def run_job(inputs: JobInputs, out_dir: Path, hooks: JobHooks | None = None) -> JobOutput:
    hooks = hooks or JobHooks()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = "loading"
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if hooks.progress is not None:
            hooks.progress(done, total, stage)

    progress(0, 0)
    base = inputs.config
    # ``none`` measures the base configuration: no search, so no budget to meet or miss.
    budget = inputs.budget if inputs.strategy != "none" else Budget()
    if inputs.strategy != "none":
        from .evaluator import ensure_ray

        # Before the statistics: a cluster that cannot be reached fails in a second, not after
        # minutes of work (``RayUnavailable``).
        ensure_ray()
    model = load_model(inputs.model, inputs.weights)
    data = load_data(inputs, model)
    n_val = count(data.x_val)
    if inputs.strategy != "none" and n_val == 0:
        raise ValueError("a search needs held-out training images to score candidates, and "
                         "the training split has none beyond the calibration images: lower "
                         "data.calib_size or add training images")
    stage = "statistics"
    progress(0, 0)
    calibrator = Calibrator(model, data.calib, base)
    base_model = calibrator.calibrate(base)
    space = SearchSpace.from_model(base_model, data.calib)
    t1 = time.perf_counter()

    stage = "search"
    on_scored = None
    if hooks.on_scored is not None:
        def on_scored(seq: int, cand: Candidate, score: Score) -> None:
            hooks.on_scored(seq, cand, score, run.point(cand, score))

    pool = None
    if inputs.strategy != "none":
        from .evaluator import EvaluatorPool, JobContext

        pool = EvaluatorPool(JobContext(model, calibrator, data.x_val, base), inputs.workers,
                             cancelled=hooks.cancelled)
    try:
        # Without held-out images (a tiny ImageFolder), the one candidate of ``none`` is scored
        # on the calibration images; it chooses nothing, and the report says so.
        val = data.x_val if n_val else data.calib
        objective = pool if pool is not None else Objective(model, calibrator, val, base)
        run = SearchRun(space, objective, budget, inputs.stop,
                        evaluate_many=pool.map if pool is not None else None,
                        known=hooks.known, on_scored=on_scored, progress=progress,
                        cancelled=hooks.cancelled)
        result = _search(inputs, run)
    finally:
        if pool is not None:
            pool.shutdown()
    t2 = time.perf_counter()

    stage = "artifacts"
    progress(run.done, run.done)
    best = calibrator.calibrate(result.best.config(base))
    text = is_text(data.x_test)
    y_test = None if text else data.y_test
    n_test = count(data.x_test)

    def images_done(what: str):
        """Progress of a pass over the test samples (done of ``n_test``). A pass over 10,000
        images takes minutes: a cancelled job, or a dispatcher asked to stop, stops it at the
        next batch."""
        def report(done: int) -> None:
            if hooks.progress is not None:
                hooks.progress(done, n_test, f"test {'texts' if text else 'images'}: {what}")
            if hooks.cancelled is not None and hooks.cancelled():
                raise SearchCancelled(f"stopped while evaluating the test split ({what})")
        return report

    if text:  # cosine and nearest-neighbour agreement of the sentence embeddings
        fp_out = embeddings_of(model, data.x_test, progress=images_done("FP32"))
        q_out = embeddings_of(best, data.x_test, progress=images_done("quantized"))
        test_metrics = compare_embeddings(fp_out, q_out).to_dict()
    else:
        fp_out = logits_of(model, data.x_test, progress=images_done("FP32"))
        q_out = logits_of(best, data.x_test, progress=images_done("quantized"))
        test_metrics = compare(fp_out, q_out, y_test).to_dict()
    name = f"{inputs.model}_{base.method}_w{base.w_bits}a{base.a_bits}"
    ckpt = save_quantized(best, out_dir / f"{name}.safetensors", metrics=test_metrics)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    files = [("checkpoint", Path(ckpt), "application/octet-stream")]
    # The deployable model as ONNX, measured in ONNX Runtime on the same test split: the integer
    # program where there is one, else the fast QDQ graph of the job's quantizers.
    stage = "onnx"
    progress(run.done, run.done)
    t_onnx = time.perf_counter()
    form = default_form(ckpt)  # the integer graph where the checkpoint has a program
    try:
        onnx_path = export_onnx(ckpt, out_dir / f"{name}.onnx", form=form,
                                operands=inputs.onnx_operands)
    except ExportError as e:  # a family or quantizer with no ONNX form: the result says which
        onnx_metrics = onnx_unavailable(base.setting, str(e))
    else:
        onnx_metrics = evaluate_onnx(onnx_path, data.x_test, y_test, fp_out, q_out, form,
                                     progress=images_done("ONNX Runtime"))
        if form == "qdq":  # s8s8 is exact on this CPU only where its int8 kernels are
            onnx_metrics |= {"operands": inputs.onnx_operands,
                             "exact_on_any_cpu": inputs.onnx_operands == "u8u8"}
        files.append(("onnx", onnx_path, ONNX_MEDIA_TYPE))
    onnx_s = time.perf_counter() - t_onnx
    stage = "artifacts"
    progress(run.done, run.done)
    del fp_out, q_out
    plots = out_dir / "plots"
    if inputs.plots and inputs.strategy != "none":
        files.append(("plot", plot_front(result.front, _mk(plots) / "pareto_front.png"),
                      "image/png"))
    if inputs.plots:
        files += [("plot", p, "image/png") for p in plot_histograms(best, data.calib, plots)]
    t3 = time.perf_counter()
    timings = {"load_and_statistics_s": round(t1 - t0, 2), "search_s": round(t2 - t1, 2),
               "artifacts_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
               "onnx_s": round(onnx_s, 2)}
    size = Path(ckpt).stat().st_size
    summary = result.to_dict()
    front = summary.pop("front")
    out = {**test_metrics, "size_bytes": size, "fp32_size_bytes": fp32_bytes,
           "compression": round(fp32_bytes / size, 2), "candidate": result.best.to_dict(),
           "search": summary, "onnx": onnx_metrics}
    report = {"model": inputs.model, "weights": str(inputs.weights), "strategy": inputs.strategy,
              "config": asdict(base),
              # what the config's unset (None) fields were, as the checkpoint records them
              "family_choices": read_recipe(ckpt).get("resolved"),
              "seed": base.seed, "result": out, "pareto_front": front,
              "budget": asdict(budget), "stop": asdict(inputs.stop),
              "calibration_sample_ids": data.calib_ids, "inputs": "texts" if text else "images",
              **({"corpus_digest": data.corpus_digest} if text else {}),
              "test_images": n_test,
              **({} if text else {"samples": data.samples()}),
              "validation_images": n_val,
              "candidates_scored_on": "validation" if n_val else "calibration",
              "layers": best.layer_report(),
              # the integer setting: per operator its multipliers, shifts, worst-case bits
              **({"integer": best.program.report()} if best.program is not None else {}),
              "costs": result.costs, "versions": _versions(text), "timings": timings,
              "workers": inputs.workers}
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    files.insert(1, ("report", report_path, "application/json"))
    return JobOutput(out, timings, files)


def _mk(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder

