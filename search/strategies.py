"""Search strategies. Each returns the best candidate under the budget and the Pareto front.

``greedy_mixed_precision`` is MPTQ-ViT's rule: start every layer at the highest width, then
repeatedly lower the layer whose step down costs the least loss (KL to the FP logits) per bit
saved, until the budget holds. Departure: the loss of each step is predicted from one-shot
sensitivities (each layer lowered alone, measured once), not re-measured for every layer at every
step, which would cost layers × steps evaluations; the chosen step is then measured exactly, so
every point of the returned front is a measured one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .objective import Score
from .space import Candidate, SearchSpace

WIDTHS = (8, 6, 5, 4)
# Kinds whose width the search may lower; image input and embeddings stay 8-bit.
SEARCH_KINDS = frozenset({"weight", "linear_input", "qk", "value", "post_softmax", "post_gelu",
                          "ln_input"})


@dataclass(frozen=True)
class Budget:
    """Upper bounds; ``None`` = unconstrained."""

    weight_bits: float | None = None      # mean weight bits, weighted by elements
    activation_bits: float | None = None  # mean activation bits, weighted by elements per image

    def over(self, space: SearchSpace, cand: Candidate) -> tuple[bool, bool]:
        w = self.weight_bits is not None and space.mean_bits(cand, True) > self.weight_bits + 1e-9
        a = (self.activation_bits is not None
             and space.mean_bits(cand, False) > self.activation_bits + 1e-9)
        return w, a


@dataclass
class SearchResult:
    best: Candidate
    score: Score
    met_budget: bool
    costs: dict
    front: list[dict] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    stopped_by: str = "budget"

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "key": self.best.key,
                "score": {"kl": self.score.kl, "agreement": self.score.agreement},
                "met_budget": self.met_budget, "costs": self.costs, "front": self.front,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 2),
                "stopped_by": self.stopped_by}


def costs_of(space: SearchSpace, cand: Candidate) -> dict:
    return {"weight_bits": round(space.mean_bits(cand, True), 4),
            "activation_bits": round(space.mean_bits(cand, False), 4),
            "weight_bytes": space.weight_bytes(cand), "bitops": space.bitops(cand)}


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated in (mean of weight and activation bits, KL), cheapest first."""
    def cost(p: dict) -> float:
        return (p["weight_bits"] + p["activation_bits"]) / 2

    front = []
    for p in sorted(points, key=lambda p: (cost(p), p["kl"])):
        if not front or p["kl"] < front[-1]["kl"]:
            front.append(p)
    return front


def greedy_mixed_precision(space: SearchSpace, objective: Callable[[Candidate], Score],
                           budget: Budget, widths: tuple[int, ...] = WIDTHS,
                           kinds: frozenset[str] = SEARCH_KINDS,
                           max_candidates: int | None = None,
                           time_budget_s: float | None = None,
                           progress: Callable[[int, str], None] | None = None,
                           evaluate_many: Callable[[list[Candidate]], list[Score]] | None = None,
                           ) -> SearchResult:
    """``evaluate_many`` scores a batch at once (a Ray pool); the one-shot sensitivities, the
    bulk of the work, go through it."""
    start = time.perf_counter()
    slots = [s for s in space.slots.values() if s.kind in kinds]
    state = {s.name: s.bits for s in slots}
    evaluations = 0

    def evaluate(cand: Candidate) -> Score:
        nonlocal evaluations
        evaluations += 1
        score = objective(cand)
        if progress is not None:
            progress(evaluations, cand.key)
        return score

    def candidate() -> Candidate:
        return Candidate.make({n: b for n, b in state.items() if b != space.slots[n].bits})

    def out_of_time() -> str | None:
        if max_candidates is not None and evaluations >= max_candidates:
            return "max_candidates"
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            return "time_budget"
        return None

    def point(cand: Candidate, score: Score) -> dict:
        return {"key": cand.key, **costs_of(space, cand), "kl": score.kl,
                "agreement": score.agreement}

    cur = candidate()
    score = evaluate(cur)
    points = [point(cur, score)]
    sensitivity: dict[tuple[str, int], float] = {}
    stopped = None
    probes = [(s.name, w) for s in slots for w in widths if w < s.bits]
    if max_candidates is not None and len(probes) > max_candidates - evaluations:
        probes, stopped = probes[:max(0, max_candidates - evaluations)], "max_candidates"
    batch = [Candidate.make({n: w}) for n, w in probes]
    if evaluate_many is None:
        scores = [evaluate(c) for c in batch]
    else:
        scores = evaluate_many(batch)
        evaluations += len(batch)
        if progress is not None:
            progress(evaluations, "sensitivities")
    for probe, s in zip(probes, scores, strict=True):
        sensitivity[probe] = s.kl - score.kl
    if stopped is None:
        stopped = out_of_time()
    while stopped is None:
        over_w, over_a = budget.over(space, cur)
        if not (over_w or over_a):
            break
        best_name, best_ratio, best_width = None, float("inf"), 0
        for s in slots:
            if (s.kind == "weight" and not over_w) or (s.kind != "weight" and not over_a):
                continue
            lower = [w for w in widths if w < state[s.name] and (s.name, w) in sensitivity]
            if not lower:
                continue
            nxt = max(lower)
            gain = sensitivity[s.name, nxt] - sensitivity.get((s.name, state[s.name]), 0.0)
            ratio = gain / (s.elements * (state[s.name] - nxt))
            if ratio < best_ratio:
                best_name, best_ratio, best_width = s.name, ratio, nxt
        if best_name is None:
            stopped = "exhausted"
            break
        state[best_name] = best_width
        cur = candidate()
        score = evaluate(cur)
        points.append(point(cur, score))
        stopped = out_of_time()
    over_w, over_a = budget.over(space, cur)
    return SearchResult(best=cur, score=score, met_budget=not (over_w or over_a),
                        costs=costs_of(space, cur), front=pareto_front(points),
                        evaluations=evaluations, seconds=time.perf_counter() - start,
                        stopped_by=stopped or "budget")
