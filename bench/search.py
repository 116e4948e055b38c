"""Search benchmark on the digits ViT, fully quantized (issue "Search on Ray").

    python -m bench.search [--json out/search_bench.json] [--budget 4.5] [--no-evolution]

1. Scaling: the same greedy search (budget: mean weight bits and mean activation bits each at
   most ``--budget``) with 1 and with 2 Ray workers, side by side in one run; search time only
   (the statistics are collected once, before either). The two must find the same candidate.
2. Quality: the greedy result's test top-1 against FP32 and against uniform widths (uniform
   min-max W4A4 and TSPTQ W4A4), all measured here.
3. The evolutionary strategy seeded with the greedy result (2 workers), with its defaults and
   with the settings before them (``--skip-front`` stops here).
4. The Pareto front from 8 down to 4 mean bits (a greedy run to the lowest reachable budget),
   with test top-1 of the front points nearest 8, 7, 6, 5, 4.5 bits and of the cheapest.

``--cluster`` instead: the same greedy search on real Ray clusters started here
(``bench.cluster``, every node on 127.0.0.1): 1 node with 1 worker, 1 node with 2 workers, and 2
nodes with 1 worker each, alternated ``--repeats`` times (default 3), medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import ray
import torch

from quant import Calibrator, QuantConfig, quantize
from quant.evaluate import compare, logits_of
from quant.zoo.data import digits_data
from quant.zoo.models import load_model
from search.space import Candidate, SearchSpace
from search.strategies import (
    SEARCH_KINDS,
    Budget,
    EvolutionSettings,
    SearchResult,
    SearchRun,
    costs_of,
    evolutionary_search,
    greedy_mixed_precision,
)
from workers.evaluator import EvaluatorPool, JobContext, ensure_ray


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other machines (``/proc/stat``; 0 where unreadable)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def minor_faults(pid: int) -> int:
    """Pages process ``pid`` has faulted in without reading from disk (``/proc/PID/stat``; 0
    where unreadable): each one a page the kernel zeroed for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[7])


def timed_search(ctx: JobContext, space: SearchSpace, budget: Budget, workers: int,
                 strategy=greedy_mixed_precision, nodes: list | None = None,
                 details: list | None = None, **kw) -> tuple[SearchResult, SearchRun, float]:
    """``nodes``: gets the number of nodes the actors run on; ``details``: the run's module
    searches per actor, the actors' CPU seconds and the machine's stolen seconds (what tells a
    slow run on a shared machine from slower code)."""
    pool = EvaluatorPool(ctx, workers)
    try:
        pool.warm_up()  # actors up and warm before the clock starts
        if nodes is not None:
            nodes.append(len(set(pool.nodes())))
        procs = [psutil.Process(pid) for pid in ray.get([a.ping.remote() for a in pool.actors])]
        cpu, steal = [sum(p.cpu_times()[:2]) for p in procs], steal_seconds()
        faults = sum(minor_faults(p.pid) for p in procs)
        run = SearchRun(space, pool, budget, evaluate_many=pool.map)
        t = time.perf_counter()
        result = strategy(run, **kw)
        secs = time.perf_counter() - t
        info = {"module_searches": pool.module_searches(),
                "actor_cpu_s": round(sum(sum(p.cpu_times()[:2]) for p in procs) - sum(cpu), 1),
                "steal_s": round(steal_seconds() - steal, 1),
                "actor_page_faults": sum(minor_faults(p.pid) for p in procs) - faults}
        print(f"   (scored ahead {pool.ahead_scored}, of which asked for {pool.ahead_used}; "
              f"module searches per actor {info['module_searches']}, actors' CPU "
              f"{info['actor_cpu_s']} s, stolen {info['steal_s']} s, pages faulted in "
              f"{info['actor_page_faults']})", file=sys.stderr)
        if details is not None:
            details.append(info)
        return result, run, secs
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", type=float, default=4.5)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-evolution", action="store_true")
    p.add_argument("--skip-front", action="store_true", help="stop after part 3")
    p.add_argument("--scaling-only", action="store_true",
                   help="only part 1 (to re-measure the timings on a quiet machine)")
    p.add_argument("--repeats", type=int,
                   help="part 1 (default 1) and --cluster (default 3): alternate the setups "
                        "this many times; medians reported")
    p.add_argument("--cluster", action="store_true",
                   help="only the search on real multi-node clusters (see above)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.cluster:
        ensure_ray(num_cpus=2)

    base = QuantConfig()
    model = load_model("digits_vit")
    data = digits_data(base.calib_size, base.seed, val_size=256)
    calibrator = Calibrator(model, data.calib, base)
    space = SearchSpace.from_model(calibrator.calibrate(base), data.calib)
    ctx = JobContext(model, calibrator, data.x_val, base)
    fp = logits_of(model, data.x_test)

    def test_of(cand: Candidate) -> dict:
        q = calibrator.calibrate(cand.config(base))
        return compare(fp, logits_of(q, data.x_test), data.y_test).to_dict()

    out: dict = {"budget": args.budget, "test_images": len(data.y_test),
                 "validation_images": len(data.x_val)}
    budget = Budget(args.budget, args.budget)
    if args.cluster:
        out["cluster"] = on_clusters(ctx, space, budget, args.repeats or 3)
        print_clusters(out["cluster"])
        _write(out, args.json)
        return 0

    print("1. scaling: the same greedy search with 1 and 2 workers", file=sys.stderr)
    results: dict[int, list[SearchResult]] = {1: [], 2: []}
    seconds: dict[int, list[float]] = {1: [], 2: []}
    details: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats or 1):
        for workers in (1, 2):
            res, _, secs = timed_search(ctx, space, budget, workers, details=details[workers])
            results[workers].append(res)
            seconds[workers].append(secs)
            print(f"   {workers} worker(s): {secs:.1f} s, {res.evaluations} candidates",
                  file=sys.stderr)
    t1, t2 = statistics.median(seconds[1]), statistics.median(seconds[2])
    runs = results[1] + results[2]
    greedy = results[2][0]
    out["scaling"] = {"seconds_1": round(t1, 1), "seconds_2": round(t2, 1),
                      "all_seconds": seconds, "speedup": round(t1 / t2, 2),
                      "pair_speedups": [round(a / b, 2)
                                        for a, b in zip(seconds[1], seconds[2], strict=True)],
                      "details": details,
                      "candidates": greedy.evaluations,
                      "same_result": len({(r.best.key, tuple(q["key"] for q in r.front))
                                          for r in runs}) == 1}
    if args.scaling_only:
        return _stop_early(out, "scaling", args.json)

    print("2. quality", file=sys.stderr)
    uniform = {}
    # W4A4 everywhere the search may lower (the image input and embeddings stay 8-bit there as
    # here): its real mean bits, on the same scale as the budget.
    w4a4 = costs_of(space, Candidate.make({n: 4 for n, sl in space.slots.items()
                                           if sl.kind in SEARCH_KINDS}))
    for method in ("uniform", "tsptq"):
        q = quantize(model, data.calib, QuantConfig(method=method, w_bits=4, a_bits=4))
        uniform[method] = compare(fp, logits_of(q, data.x_test), data.y_test).to_dict()
    out["quality"] = {"greedy": {"costs": greedy.costs, "test": test_of(greedy.best),
                                 "key": greedy.best.key, "met_budget": greedy.met_budget},
                      "uniform_w4a4": uniform["uniform"], "tsptq_w4a4": uniform["tsptq"],
                      "w4a4_costs": w4a4}
    if not args.no_evolution:
        print("3. evolutionary, seeded with the greedy result", file=sys.stderr)
        # The defaults, and the settings before them (0.15 per gene, random first generation).
        for key, extra in (("evolutionary", {}),
                           ("evolutionary_before", {"mutation_rate": 0.15,
                                                    "seed_mutants": False})):
            evo, _, secs = timed_search(
                ctx, space, budget, 2, evolutionary_search, seeds=[greedy.best],
                settings=EvolutionSettings(population=8, generations=6, **extra))
            out["quality"][key] = {"costs": evo.costs, "test": test_of(evo.best),
                                   "key": evo.best.key, "seconds": round(secs, 1),
                                   "candidates": evo.evaluations, "val_kl": evo.score.kl,
                                   "greedy_val_kl": greedy.score.kl}

    if args.skip_front:
        return _stop_early(out, "quality", args.json)
    print("4. Pareto front from 8 to 4 mean bits", file=sys.stderr)
    low, run, secs = timed_search(ctx, space, Budget(4.0, 4.0), 2)
    cands = {k: c for k, (c, _) in run.scores.items()}
    front = low.front

    def mean(q: dict) -> float:
        return (q["weight_bits"] + q["activation_bits"]) / 2

    picks = {min(front, key=lambda q: abs(mean(q) - b))["key"] for b in (8, 7, 6, 5, 4.5)}
    picks.add(front[0]["key"])
    out["front"] = [{**q, "mean_bits": round(mean(q), 3),
                     "test": test_of(cands[q["key"]]) if q["key"] in picks else None}
                    for q in front]
    out["front_search"] = {"seconds": round(secs, 1), "candidates": low.evaluations,
                           "stopped_by": low.stopped_by}

    s, qd = out["scaling"], out["quality"]
    fp32 = qd["uniform_w4a4"]["fp32_top1"]
    print(f"\nDigits ViT, fully quantized; test split {len(data.y_test)} images, FP32 top-1 "
          f"{fp32:.2%}; candidates scored on {len(data.x_val)} held-out training images\n")
    print("| workers | search s | candidates | same result |\n|---|---|---|---|")
    print(f"| 1 | {s['seconds_1']} | {s['candidates']} | |")
    print(f"| 2 | {s['seconds_2']} | {s['candidates']} | {s['same_result']} |")
    print(f"\nspeedup with 2 workers: {s['speedup']}×\n")
    print("| configuration | weight bits | act. bits | test top-1 | drop vs FP32 | agreement |")
    print("|---|---|---|---|---|---|")
    rows = [("uniform min-max W4A4", qd["w4a4_costs"], qd["uniform_w4a4"]),
            ("TSPTQ W4A4", qd["w4a4_costs"], qd["tsptq_w4a4"]),
            (f"TSPTQ greedy mixed, budget {args.budget}", qd["greedy"]["costs"],
             qd["greedy"]["test"])]
    for key, name in (("evolutionary", "TSPTQ evolutionary (seeded by greedy)"),
                      ("evolutionary_before", "the same, settings before (0.15, random fill)")):
        if key in qd:
            rows.append((name, qd[key]["costs"], qd[key]["test"]))
    for name, c, t in rows:
        print(f"| {name} | {c['weight_bits']:.2f} | {c['activation_bits']:.2f} | "
              f"{t['top1']:.2%} | {(fp32 - t['top1']) * 100:+.2f} | {t['agreement']:.2%} |")
    print("\n| mean bits | weight bits | act. bits | val KL | val agreement | test top-1 |")
    print("|---|---|---|---|---|---|")
    shown = {min(out["front"], key=lambda q: abs(q["mean_bits"] - b))["key"]
             for b in (8, 7.5, 7, 6.5, 6, 5.5, 5, 4.75, 4.5, 4.25, 4)} | picks
    print(f"({len(out['front'])} points on the front; those nearest each quarter/half bit "
          "shown, all in the JSON)")
    for q in reversed(out["front"]):
        if q["key"] not in shown:
            continue
        t = f"{q['test']['top1']:.2%}" if q["test"] else ""
        print(f"| {q['mean_bits']:.2f} | {q['weight_bits']:.2f} | {q['activation_bits']:.2f} | "
              f"{q['kl']:.2e} | {q['agreement']:.2%} | {t} |")
    _write(out, args.json)
    return 0


# (name, nodes, CPUs per node, workers)
CLUSTER_SETUPS = (("1 node, 1 worker", 1, 1, 1), ("1 node, 2 workers", 1, 2, 2),
                  ("2 nodes, 1 worker each", 2, 1, 2))


def on_clusters(ctx: JobContext, space: SearchSpace, budget: Budget, repeats: int) -> dict:
    """Each setup on a cluster of its own, started and stopped around its run; this process is
    the driver (its Ray attaches to the head)."""
    import ray

    from .cluster import ray_cluster

    runs: dict[str, list[dict]] = {name: [] for name, *_ in CLUSTER_SETUPS}
    for _ in range(repeats):
        for name, nodes, cpus, workers in CLUSTER_SETUPS:
            with ray_cluster(worker_nodes=nodes - 1, cpus_per_node=cpus, dashboard=False) as c:
                ray.init(address=c.address, log_to_driver=False)
                placed: list[int] = []
                try:
                    res, _, secs = timed_search(ctx, space, budget, workers, nodes=placed)
                finally:
                    ray.shutdown()
            runs[name].append({"seconds": round(secs, 1), "nodes_used": placed[0],
                               "best": res.best.key,
                               "front": [q["key"] for q in res.front]})
            print(f"   {name}: {secs:.1f} s, actors on {placed[0]} node(s)", file=sys.stderr)
    medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    one = medians[CLUSTER_SETUPS[0][0]]
    return {"runs": runs, "median_seconds": medians,
            "speedup": {name: round(one / m, 2) for name, m in medians.items()},
            "two_nodes_over_one": round(medians[CLUSTER_SETUPS[2][0]]
                                        / medians[CLUSTER_SETUPS[1][0]], 3),
            "same_result": len({(r["best"], tuple(r["front"]))
                                for rs in runs.values() for r in rs}) == 1}


def print_clusters(c: dict) -> None:
    print("\n| setup | search s (each run) | median s | speed-up vs 1 worker | nodes used |")
    print("|---|---|---|---|---|")
    for name, rs in c["runs"].items():
        print(f"| {name} | {', '.join(str(r['seconds']) for r in rs)} | "
              f"{c['median_seconds'][name]:.1f} | {c['speedup'][name]}× | "
              f"{max(r['nodes_used'] for r in rs)} |")
    print(f"\n2 nodes against 1 node with 2 workers: {c['two_nodes_over_one']:.3f}× the time; "
          f"the same best candidate and front in every run: {c['same_result']}")


def _write(out: dict, path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))


def _stop_early(out: dict, part: str, path: Path | None) -> int:
    """Print the part measured so far and write everything measured."""
    print(json.dumps(out[part], indent=2))
    _write(out, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
