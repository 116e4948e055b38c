"""Run a search without the service.

    python -m search.run --model digits_vit --strategy greedy --budget-bits 4.5 --workers 2 \\
        --json out/search.json [--out out/search] [--max-candidates N] [--time-budget S]

Strategies: ``greedy`` (MPTQ-ViT mixed precision; needs a budget), ``thresholds`` (per-quantizer
V-2SF/O-2SF parameters at fixed widths), ``evolutionary`` (bit widths and parameters jointly),
``none`` (one candidate: the base configuration).

Calibrates on ``--calib-size`` training images, scores candidates on ``--val-size`` other
training images (never the test split), and reports the best candidate's accuracy on the test
split once, at the end. ``--budget-bits`` bounds both the mean weight bits and the mean
activation bits (weighted by the elements each quantizer handles per image);
``--budget-weight-bits`` and ``--budget-activation-bits`` set them apart. Candidates are scored
by ``--workers`` Ray actors (a local Ray, or the cluster named by ``RAY_ADDRESS``).

``--json`` gets the report: the best candidate, its test metrics, the Pareto front, the
per-layer configuration and the timings. ``--out`` gets the checkpoint, report.json and the PNG
plots (the Pareto front, and per V-2SF/O-2SF quantizer its activations with the chosen split).
``--data DIR`` takes an ImageFolder root (train/, val/) instead of the bundled digits.
``--model minilm`` searches the MiniLM text encoder on its bundled corpus (stdlib docstrings).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from quant import METHODS, QuantConfig
from quant.config import SETTINGS, WEIGHT_ROUNDINGS

from .strategies import Budget, EvolutionSettings, StopCriteria

STRATEGIES = ("greedy", "thresholds", "evolutionary", "none")


def inputs_from(args: argparse.Namespace):
    from workers.jobs import JobInputs

    return JobInputs(
        model=args.model, weights=args.weights, data=args.data, calib_size=args.calib_size,
        val_size=args.val_size, test_limit=args.test_limit,
        config=QuantConfig(method=args.method, setting=args.setting, seed=args.seed,
                           calib_size=args.calib_size, weight_rounding=args.weight_rounding),
        strategy=args.strategy,
        budget=Budget(args.budget_weight_bits or args.budget_bits,
                      args.budget_activation_bits or args.budget_bits,
                      args.budget_weight_bytes, args.budget_bitops),
        stop=StopCriteria(args.max_candidates, args.time_budget, args.target_agreement),
        evolution=EvolutionSettings(population=args.population, generations=args.generations,
                                    seed=args.seed),
        workers=args.workers)


def run(args: argparse.Namespace) -> dict:
    from workers.jobs import JobHooks, run_job

    bar = tqdm(desc="candidates", unit="cand", file=sys.stderr)

    def progress(done: int, total: int, stage: str) -> None:
        bar.set_postfix_str(stage, refresh=False)
        bar.total = total or None
        bar.update(done - bar.n)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = run_job(inputs_from(args), args.out or Path(tmp), JobHooks(progress=progress))
            report_path = next(p for kind, p, _ in out.files if kind == "report")
            return json.loads(report_path.read_text())
    finally:
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="digits_vit")
    p.add_argument("--weights", default="pretrained",
                   help="pretrained, random, or a local weights file")
    p.add_argument("--data", default="digits", help="digits, or an ImageFolder root")
    p.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    p.add_argument("--method", default="tsptq", choices=METHODS)
    p.add_argument("--setting", default="full", choices=SETTINGS)
    p.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS,
                   help="gptq: error-compensating weight rounding (quant.rounding); default: "
                   "the model family's choice for the setting")
    p.add_argument("--budget-bits", type=float, default=4.5)
    p.add_argument("--budget-weight-bits", type=float)
    p.add_argument("--budget-activation-bits", type=float)
    p.add_argument("--budget-weight-bytes", type=float, help="quantized weights' size")
    p.add_argument("--budget-bitops", type=float, help="BitOPs per image")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-candidates", type=int)
    p.add_argument("--time-budget", type=float, help="seconds")
    p.add_argument("--target-agreement", type=float,
                   help="stop once a candidate within budget reaches this validation top-1 "
                        "agreement with FP32 (0..1)")
    p.add_argument("--population", type=int, default=8, help="evolutionary")
    p.add_argument("--generations", type=int, default=10, help="evolutionary")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--test-limit", type=int,
                   help="evaluate the result on a fixed subset of this many test samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--out", type=Path, help="write the checkpoint, report and plots here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("workers", "calib_size", "val_size", "population", "generations"):
        if getattr(args, name) < 1:
            print(f"search.run: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    for name in ("max_candidates", "test_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"search.run: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    from workers.evaluator import RayUnavailable

    try:
        report = run(args)
    except (ValueError, FileNotFoundError, RayUnavailable) as e:
        print(f"search.run: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    r = report["result"]
    c = report["costs"]
    if "cosine" in r:  # a text encoder: embeddings against FP32's
        test = (f"test cosine {r['cosine']:.4f}, nearest-neighbour agreement "
                f"{r['nn_agreement']:.2%}")
    else:
        test = f"test top-1 {r['top1']:.2%} (FP32 {r['fp32_top1']:.2%})"
    print(f"best {r['search']['key']}: weight bits {c['weight_bits']:.2f}, activation bits "
          f"{c['activation_bits']:.2f}; {r['search']['message']}; {test}; "
          f"{r['search']['evaluations']} candidates in {report['timings']['search_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
