"""Run a search without the service.

    python -m search.run --model digits_vit --strategy greedy --budget-bits 4.5 --workers 2 \\
        --json out/search.json [--plots out/plots] [--max-candidates N] [--time-budget S]

Calibrates on 32 training images, scores candidates on a disjoint validation part of the
training split (``--val-size``), and reports the best candidate's accuracy on the test split
once, at the end. ``--budget-bits`` bounds both the mean weight bits and the mean activation
bits (weighted by the elements each quantizer handles per image); ``--budget-weight-bits`` and
``--budget-activation-bits`` set them apart. Candidates are scored by ``--workers`` Ray actors
(a local Ray, or the cluster named by ``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from quant import Calibrator, QuantConfig
from quant.evaluate import compare, logits_of
from quant.zoo.data import digits_data
from quant.zoo.models import load_model

from .space import SearchSpace
from .strategies import Budget, greedy_mixed_precision

STRATEGIES = ("greedy",)


def plot_front(front: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [(p["weight_bits"] + p["activation_bits"]) / 2 for p in front]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bits, [p["kl"] for p in front], "o-")
    ax.set_xlabel("mean bits (weights and activations)")
    ax.set_ylabel("KL to FP32 on validation images")
    ax.set_yscale("log")
    ax.set_title("Pareto front")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from workers.evaluator import EvaluatorPool, JobContext

    t0 = time.perf_counter()
    base = QuantConfig(method=args.method, setting=args.setting, seed=args.seed)
    model = load_model(args.model, args.weights)
    data = digits_data(base.calib_size, args.seed, val_size=args.val_size)
    val = data.x_val
    calibrator = Calibrator(model, data.calib, base)
    space = SearchSpace.from_model(calibrator.calibrate(base), data.calib)
    budget = Budget(args.budget_weight_bits or args.budget_bits,
                    args.budget_activation_bits or args.budget_bits)
    t1 = time.perf_counter()
    pool = EvaluatorPool(JobContext(model, calibrator, val, base), args.workers)
    bar = tqdm(desc="candidates", unit="cand", file=sys.stderr)

    def progress(n: int, _key: str) -> None:
        bar.update(n - bar.n)

    try:
        result = greedy_mixed_precision(space, pool, budget, max_candidates=args.max_candidates,
                                        time_budget_s=args.time_budget, progress=progress,
                                        evaluate_many=pool.map)
    finally:
        bar.close()
        pool.shutdown()
    t2 = time.perf_counter()
    best = calibrator.calibrate(result.best.config(base))
    test = compare(logits_of(model, data.x_test), logits_of(best, data.x_test), data.y_test)
    out = {**result.to_dict(), "model": args.model, "strategy": args.strategy,
           "workers": args.workers, "budget": vars(budget), "test": test.to_dict(),
           "timings": {"statistics_s": round(t1 - t0, 2), "search_s": round(t2 - t1, 2),
                       "total_s": round(time.perf_counter() - t0, 2)}}
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        plot_front(result.front, args.plots / "pareto_front.png")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="digits_vit")
    p.add_argument("--weights", default="pretrained")
    p.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    p.add_argument("--method", default="tsptq")
    p.add_argument("--setting", default="full", choices=("full", "partial"))
    p.add_argument("--budget-bits", type=float, default=4.5)
    p.add_argument("--budget-weight-bits", type=float)
    p.add_argument("--budget-activation-bits", type=float)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-candidates", type=int)
    p.add_argument("--time-budget", type=float, help="seconds")
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model != "digits_vit":
        print("search.run: only the bundled digits data is wired up for now "
              "(--model digits_vit)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("search.run: --workers must be at least 1", file=sys.stderr)
        return 2
    out = run(args)
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    b = out["costs"]
    print(f"best {out['key']}: weight bits {b['weight_bits']:.2f}, activation bits "
          f"{b['activation_bits']:.2f}, budget met: {out['met_budget']}; test top-1 "
          f"{out['test']['top1']:.2%} (FP32 {out['test']['fp32_top1']:.2%}), "
          f"{out['evaluations']} candidates in {out['timings']['search_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
