"""Search strategies. Each returns the best candidate under the budget and the Pareto front.

* ``threshold_search``: per-quantizer search of the pinnable parameters (V-2SF split and code
  share, O-2SF outlier threshold and exponent) by coordinate descent on the end-to-end objective.
  Calibration already picks these per layer under a local loss; this strategy re-chooses them,
  one quantizer at a time, by what they do to the model's output.
* ``greedy_mixed_precision``: MPTQ-ViT's rule. Start every layer at the highest width, then
  repeatedly lower the layer whose step down costs the least loss (KL to the FP logits) per bit
  saved, until the budget holds.
* ``evolutionary_search``: one global search over bit widths and pinned parameters jointly.

All three run through one ``SearchRun``: it evaluates batches (on a Ray pool when one is given),
never scores a candidate twice (nor one already scored by an earlier, interrupted run), records
every measured point, and applies the stop criteria. Every batch a strategy submits is fixed by
the strategy's own state and seed, never by how many workers there are, so for a fixed seed the
result does not depend on the number of workers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .objective import Score
from .space import Candidate, QuantizerSlot, SearchSpace

WIDTHS = (8, 6, 5, 4)
# Kinds whose width the search may lower; image input and embeddings stay 8-bit.
SEARCH_KINDS = frozenset({"weight", "linear_input", "qk", "value", "post_softmax", "post_gelu",
                          "ln_input"})

Objective = Callable[[Candidate], Score]


@dataclass(frozen=True)
class Prefetch:
    """What a strategy will likely ask for next, for idle workers: ``score``, candidates to
    score ahead (their scores count only once asked for); ``search``, candidates whose module
    calibrations to make ahead (a calibration depends on its module's widths and pins alone,
    so it serves every later candidate that changes that module alike). Hints change what is
    computed when, never a result."""

    score: Sequence[Candidate] = ()
    search: Sequence[Candidate] = ()


NO_PREFETCH = Prefetch()


# ``evaluate_many(candidates, done, prefetch)`` scores a batch (a Ray pool) and calls
# ``done(i, score)`` as each candidate finishes, in whatever order they finish.
EvaluateMany = Callable[[list[Candidate], Callable[[int, Score], None], Prefetch], list[Score]]


class SearchCancelled(RuntimeError):
    """The search was asked to stop (a cancelled job)."""


@dataclass(frozen=True)
class Budget:
    """Upper bounds; ``None`` = unconstrained."""

    weight_bits: float | None = None      # mean weight bits, weighted by elements
    activation_bits: float | None = None  # mean activation bits, weighted by elements per image
    weight_bytes: float | None = None     # the quantized weights' size
    bitops: float | None = None           # Σ MACs × operand bits × operand bits, per image

    def over(self, space: SearchSpace, cand: Candidate) -> tuple[bool, bool]:
        """(weights over budget, activations over budget). Over the BitOPs bound, both are:
        lowering either operand of a matmul saves BitOPs."""
        w = self.weight_bits is not None and space.mean_bits(cand, True) > self.weight_bits + 1e-9
        w |= self.weight_bytes is not None and space.weight_bytes(cand) > self.weight_bytes
        a = (self.activation_bits is not None
             and space.mean_bits(cand, False) > self.activation_bits + 1e-9)
        if self.bitops is not None and space.bitops(cand) > self.bitops:
            w = a = True
        return w, a

    def excess(self, space: SearchSpace, cand: Candidate) -> float:
        """How far over the budget, in bits (relative excesses of bytes and BitOPs count as
        that share of 8 bits); 0 when it holds."""
        out = 0.0
        if self.weight_bits is not None:
            out += max(0.0, space.mean_bits(cand, True) - self.weight_bits)
        if self.activation_bits is not None:
            out += max(0.0, space.mean_bits(cand, False) - self.activation_bits)
        if self.weight_bytes is not None:
            out += 8 * max(0.0, space.weight_bytes(cand) / self.weight_bytes - 1)
        if self.bitops is not None:
            out += 8 * max(0.0, space.bitops(cand) / self.bitops - 1)
        return out


@dataclass(frozen=True)
class StopCriteria:
    """Besides the budget: stop after this many evaluations, after this many seconds, or once a
    candidate within budget agrees with FP32's top-1 on at least this share of the validation
    images. Whatever stops a search, its best candidate is returned."""

    max_candidates: int | None = None
    time_budget_s: float | None = None
    target_agreement: float | None = None


# ``SearchResult.stopped_by`` of a run that searched nothing: the base configuration, measured.
SINGLE = "single_configuration"


@dataclass
class SearchResult:
    best: Candidate
    score: Score
    met_budget: bool
    costs: dict
    front: list[dict] = field(default_factory=list)
    evaluations: int = 0
    reused: int = 0          # scores taken from an earlier run of the same job, not recomputed
    seconds: float = 0.0
    stopped_by: str = "budget"
    target_met: bool | None = None  # None: no accuracy target was set

    @property
    def message(self) -> str:
        if self.stopped_by == SINGLE:
            return "one configuration calibrated and measured (strategy none: no search, no budget)"
        parts = [f"stopped by {self.stopped_by}"]
        if not self.met_budget:
            parts.append("the best candidate found does not meet the budget")
        if self.target_met is False:
            parts.append("the accuracy target was not reached; this is the best candidate found")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "key": self.best.key,
                "score": {"kl": self.score.kl, "agreement": self.score.agreement},
                "met_budget": self.met_budget, "target_met": self.target_met,
                "costs": self.costs, "front": self.front, "evaluations": self.evaluations,
                "reused": self.reused, "seconds": round(self.seconds, 2),
                "stopped_by": self.stopped_by, "message": self.message}


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


class SearchRun:
    """Evaluation, bookkeeping and stop criteria shared by the strategies.

    ``known``: scores from an earlier run of the same job (a resumed job does not recompute
    them). ``on_scored(seq, candidate, score)`` sees every newly measured candidate as soon as
    it is measured (the service stores it); ``seq`` numbers candidates in the order the strategy
    proposed them. ``progress(done, total)`` gets the evaluations so far and the expected total.
    ``cancelled()``, polled before each batch and by the pool, stops the search
    (``SearchCancelled``)."""

    def __init__(self, space: SearchSpace, objective: Objective, budget: Budget,
                 stop: StopCriteria | None = None, evaluate_many: EvaluateMany | None = None,
                 known: dict[str, Score] | None = None,
                 on_scored: Callable[[int, Candidate, Score], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.space, self.objective, self.budget = space, objective, budget
        self.stop = stop or StopCriteria()
        self.evaluate_many = evaluate_many
        self.known = dict(known or {})
        self.on_scored, self.progress, self.cancelled = on_scored, progress, cancelled
        self.proposed = 0  # distinct candidates handed out so far (the next one's ``seq``)
        self.scores: dict[str, tuple[Candidate, Score]] = {}
        self.evaluations = 0
        self.reused = 0
        self.expected = 0
        self.stopped_by: str | None = None
        self.start = time.perf_counter()

    def expect(self, n: int) -> None:
        """Raise the expected total (for progress) by ``n`` evaluations."""
        self.expected += n
        self._report()

    @property
    def done(self) -> int:
        """Candidates scored, here or (``known``) by an earlier run of the job: a resumed job
        has the same ``max_candidates`` in all, and stops where it would have."""
        return self.evaluations + self.reused

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, max(self.expected, self.done))

    def feasible(self, cand: Candidate) -> bool:
        return self.budget.excess(self.space, cand) == 0.0

    def check_stop(self) -> str | None:
        """The first stop criterion that holds now (it sticks once set)."""
        if self.stopped_by is None:
            s = self.stop
            if s.max_candidates is not None and self.done >= s.max_candidates:
                self.stopped_by = "max_candidates"
            elif (s.time_budget_s is not None
                  and time.perf_counter() - self.start > s.time_budget_s):
                self.stopped_by = "time_budget"
            elif s.target_agreement is not None and any(
                    self.feasible(c) and sc.agreement >= s.target_agreement
                    for c, sc in self.scores.values()):
                self.stopped_by = "target"
        return self.stopped_by

    def evaluate(self, candidates: Sequence[Candidate], prefetch: Prefetch = NO_PREFETCH
                 ) -> list[Score | None]:
        """Scores in order; ``None`` for those left unevaluated because a stop criterion holds
        (a batch is cut to what ``max_candidates`` still allows). ``prefetch``: hints to the
        pool."""
        if self.stop.max_candidates is not None and self.stop.max_candidates < 1:
            raise ValueError("max_candidates must be at least 1")
        fresh: list[Candidate] = []
        seqs: list[int] = []
        for c in candidates:
            if c.key in self.scores or any(f.key == c.key for f in fresh):
                continue
            self.proposed += 1
            if c.key in self.known:
                self.scores[c.key] = (c, self.known[c.key])
                self.reused += 1
            else:
                fresh.append(c)
                seqs.append(self.proposed - 1)
        # The first batch always runs, so that every search has a best candidate to return.
        if fresh and (not self.scores or self.check_stop() is None):
            if self.stop.max_candidates is not None:
                fresh = fresh[:self.stop.max_candidates - self.done]

            def done(i: int, score: Score) -> None:
                self.scores[fresh[i].key] = (fresh[i], score)
                self.evaluations += 1
                if self.on_scored is not None:
                    self.on_scored(seqs[i], fresh[i], score)
                self._report()

            if self.evaluate_many is not None:
                self.evaluate_many(fresh, done, prefetch)
            else:
                for i, c in enumerate(fresh):
                    if self.cancelled is not None and self.cancelled():
                        raise SearchCancelled("search cancelled")
                    done(i, self.objective(c))
        self._report()
        return [self.scores[c.key][1] if c.key in self.scores else None for c in candidates]

    def point(self, cand: Candidate, score: Score) -> dict:
        return {"key": cand.key, **costs_of(self.space, cand), "kl": score.kl,
                "agreement": score.agreement}

    def result(self, best: Candidate | None = None, stopped_by: str | None = None
               ) -> SearchResult:
        """``best``: the strategy's own pick; by default the feasible candidate of least KL, or,
        when none is feasible, the one closest to the budget."""
        if not self.scores:
            raise RuntimeError("no candidate was evaluated: the stop criteria allow none")
        self.expected = self.done  # the estimate counted repeats: settle it
        self._report()
        if best is None:
            best = min((c for c, _ in self.scores.values()),
                       key=lambda c: (self.budget.excess(self.space, c),
                                      self.scores[c.key][1].kl))
        score = self.scores[best.key][1]
        target = self.stop.target_agreement
        return SearchResult(
            best=best, score=score, met_budget=self.feasible(best),
            costs=costs_of(self.space, best),
            front=pareto_front([self.point(c, s) for c, s in self.scores.values()]),
            evaluations=self.evaluations, reused=self.reused,
            seconds=time.perf_counter() - self.start,
            stopped_by=stopped_by or self.check_stop() or "budget",
            target_met=None if target is None else score.agreement >= target)


def _searchable(space: SearchSpace, kinds: frozenset[str]) -> list[QuantizerSlot]:
    return [s for s in space.slots.values() if s.kind in kinds]


# --------------------------------------------------------------------------- thresholds


def threshold_search(run: SearchRun, start: Candidate | None = None, passes: int = 1,
                     min_gain: float = 0.0) -> SearchResult:
    """Coordinate descent over each V-2SF/O-2SF quantizer's pinnable parameters, bit widths
    fixed at ``start``'s. For each quantizer in turn every option on the grid is scored (one
    batch, in parallel), and the best is kept when it lowers the KL by more than ``min_gain``."""
    current = start or Candidate.make()
    pinned = {n: dict(p) for n, p in current.pinned}
    slots = [s for s in run.space.slots.values() if s.params]
    run.expect(1 + passes * sum(len(s.options()) for s in slots))
    best_score = run.evaluate([current])[0]
    for _ in range(passes):
        improved = False
        for slot in slots:
            options = [Candidate.make(dict(current.bits), {**pinned, slot.name: o})
                       for o in slot.options()]
            scores = run.evaluate(options)
            scored = [(s.kl, c) for c, s in zip(options, scores, strict=True) if s is not None]
            if scored:
                kl, cand = min(scored, key=lambda t: t[0])
                if kl < best_score.kl - min_gain:
                    current, best_score, improved = cand, run.scores[cand.key][1], True
                    pinned = {n: dict(p) for n, p in current.pinned}
            if run.check_stop() is not None:
                return run.result(current)
        if not improved:
            break
    return run.result(current)


# --------------------------------------------------------------------------- greedy


def greedy_mixed_precision(run: SearchRun, widths: tuple[int, ...] = WIDTHS,
                           kinds: frozenset[str] = SEARCH_KINDS, rescore: int = 2
                           ) -> SearchResult:
    """The loss of each step is first predicted from one-shot sensitivities (each layer lowered
    alone from the top, all measured in one parallel batch), a departure from MPTQ-ViT that saves
    re-measuring every layer at every step. Then, at each step, the ``rescore`` steps with the best
    predicted loss per bit saved are measured for real, in parallel, and the one with the best
    measured loss per bit is taken. ``rescore`` is fixed, not the number of workers, so the path
    does not depend on how many workers there are; every point of the front is a measured one."""
    space, budget = run.space, run.budget
    slots = _searchable(space, kinds)
    state = {s.name: s.bits for s in slots}

    def candidate(st: dict[str, int]) -> Candidate:
        return Candidate.make({n: b for n, b in st.items() if b != space.slots[n].bits})

    probes = [(s.name, w) for s in slots for w in widths if w < s.bits]
    run.expect(1 + len(probes))
    cur = candidate(state)
    score = run.evaluate([cur])[0]
    scores = run.evaluate([Candidate.make({n: w}) for n, w in probes])
    sensitivity = {p: s.kl - score.kl for p, s in zip(probes, scores, strict=True)
                   if s is not None}

    def ranked(st: dict[str, int]) -> list[tuple[float, str, int]] | None:
        """The steps from ``st`` (predicted loss per bit saved, slot, next width), best first;
        None once ``st`` is within the budget."""
        over_w, over_a = budget.over(space, candidate(st))
        if not (over_w or over_a):
            return None
        steps = []
        for s in slots:
            if (s.kind == "weight" and not over_w) or (s.kind != "weight" and not over_a):
                continue
            lower = [w for w in widths if w < st[s.name] and (s.name, w) in sensitivity]
            if not lower:
                continue
            nxt = max(lower)
            gain = sensitivity[s.name, nxt] - sensitivity.get((s.name, st[s.name]), 0.0)
            steps.append((gain / (s.elements * (st[s.name] - nxt)), s.name, nxt))
        return sorted(steps)

    def likely_next(st: dict[str, int], trials) -> Prefetch:
        """Whichever trial wins, the others stay among the best predicted steps (their layers'
        predictions do not change), so the next step almost always measures the state with
        every trial taken: a worker that finishes its trial early scores that one ahead (146
        of 147 asked for in a digits search). Beside it the next step measures one more new
        step, the best predicted from the winner's state; its module search is the same
        whichever trial wins, so a worker that would wait for the current step's search makes
        that one meanwhile (the next step then needs no search before its measures)."""
        if len(trials) < 2:
            return NO_PREFETCH
        ahead = candidate({**st, **{name: nxt for name, nxt, _ in trials}})
        taken = {(name, nxt) for name, nxt, _ in trials}
        search: dict[tuple[str, int], Candidate] = {}
        for name, nxt, _ in trials:
            for _, step, width in (ranked({**st, name: nxt}) or [])[:rescore]:
                if (step, width) not in taken and (step, width) not in search:
                    search[step, width] = candidate({**st, step: width})  # that search alone
        return Prefetch(score=[ahead], search=list(search.values()))

    while run.check_stop() is None:
        steps = ranked(state)
        if steps is None:
            break
        if not steps:
            return run.result(cur, "exhausted")
        trials = [(name, nxt, candidate({**state, name: nxt})) for _, name, nxt in steps[:rescore]]
        run.expect(len(trials))
        measured = run.evaluate([c for *_, c in trials], prefetch=likely_next(state, trials))
        options = []
        for (name, nxt, cand), s in zip(trials, measured, strict=True):
            if s is not None:
                saved = space.slots[name].elements * (state[name] - nxt)
                options.append(((s.kl - score.kl) / saved, name, nxt, cand, s))
        if not options:
            break
        _, name, nxt, cur, score = min(options, key=lambda o: o[0])
        state[name] = nxt
    return run.result(cur)


# --------------------------------------------------------------------------- evolutionary


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 8
    generations: int = 10
    elite: int = 2
    # Per gene; None: 1 / the number of genes, so a child differs from its parents in about one
    # gene. 0.15 over the digits ViT's ~80 genes changed ~12 at once, and the search found
    # nothing better than its greedy seed (BENCHMARKS.md, the evolutionary rows).
    mutation_rate: float | None = None
    # With seeds (e.g. the greedy result), fill the first generation with their mutants rather
    # than with random candidates, which are far worse and ruin the seeds by crossover.
    seed_mutants: bool = True
    seed: int = 0


def evolutionary_search(run: SearchRun, settings: EvolutionSettings = EvolutionSettings(),
                        widths: tuple[int, ...] = WIDTHS, kinds: frozenset[str] = SEARCH_KINDS,
                        seeds: Sequence[Candidate] = ()) -> SearchResult:
    """A genetic search over every bit width and every pinnable parameter at once.

    Why evolutionary rather than Bayesian (Optuna's TPE, Ray Tune): a generation is a fixed batch
    of candidates, scored in parallel and only then used, so the search parallelises fully and
    its path depends on the seed alone, not on the number of workers or on which task finished
    first (a sequential sampler fed results in completion order would not be reproducible). The
    space is mixed and discrete with a hard budget, which a repair step handles directly: a child
    over budget has randomly chosen layers lowered (more likely the larger ones) until it fits.
    And it needs no dependency beyond the standard library.

    ``seeds`` join the first generation (e.g. the greedy strategy's result)."""
    rng = random.Random(settings.seed)
    space, budget = run.space, run.budget
    slots = _searchable(space, kinds)
    tunable = [s for s in space.slots.values() if s.params]
    rate = (1 / max(1, len(slots) + len(tunable)) if settings.mutation_rate is None
            else settings.mutation_rate)

    def make(bits: dict[str, int], pinned: dict[str, dict]) -> Candidate:
        return Candidate.make({n: b for n, b in bits.items() if b != space.slots[n].bits},
                              pinned)

    def genes(c: Candidate) -> tuple[dict[str, int], dict[str, dict]]:
        return space.bits_of(c), {n: dict(p) for n, p in c.pinned}

    def repair(bits: dict[str, int], pinned: dict[str, dict]) -> Candidate:
        cand = make(bits, pinned)
        while True:
            over_w, over_a = budget.over(space, cand)
            if not (over_w or over_a):
                return cand
            lowerable = [s for s in slots if bits[s.name] > min(widths)
                         and (over_w and over_a or (s.kind == "weight") == over_w)]
            if not lowerable:
                return cand
            s = rng.choices(lowerable, weights=[s.elements for s in lowerable])[0]
            bits[s.name] = max(w for w in widths if w < bits[s.name])
            cand = make(bits, pinned)

    def random_candidate() -> Candidate:
        bits = {s.name: rng.choice(widths) for s in slots}
        pinned = {s.name: rng.choice(s.options()) for s in tunable if rng.random() < 0.5}
        return repair({**space.bits_of(Candidate.make()), **bits}, pinned)

    def mutate(c: Candidate) -> Candidate:
        """At a low rate most draws change nothing: draw again (a few times) until one does."""
        for _ in range(20):
            child = mutate_once(c)
            if child.key != c.key:
                return child
        return child

    def mutate_once(c: Candidate) -> Candidate:
        bits, pinned = genes(c)
        for s in slots:
            if rng.random() < rate:
                i = widths.index(bits[s.name]) if bits[s.name] in widths else 0
                bits[s.name] = widths[max(0, min(len(widths) - 1, i + rng.choice((-1, 1))))]
        for s in tunable:
            if rng.random() < rate:
                if s.name in pinned and rng.random() < 0.3:
                    del pinned[s.name]  # back to calibration's own choice
                else:
                    pinned[s.name] = rng.choice(s.options())
        return repair(bits, pinned)

    def crossover(a: Candidate, b: Candidate) -> Candidate:
        (ba, pa), (bb, pb) = genes(a), genes(b)
        bits = {n: (ba if rng.random() < 0.5 else bb)[n] for n in ba}
        pinned = {}
        for n in sorted(set(pa) | set(pb)):
            src = pa if rng.random() < 0.5 else pb
            if n in src:
                pinned[n] = src[n]
        return repair(bits, pinned)

    def fitness(c: Candidate) -> tuple[float, float]:
        return budget.excess(space, c), run.scores[c.key][1].kl

    population = [repair(*genes(c)) for c in seeds][:settings.population]
    parents = list(population) if settings.seed_mutants else []
    while len(population) < settings.population:
        for _ in range(20):  # distinct candidates where a few draws can find them
            child = (mutate(parents[len(population) % len(parents)]) if parents
                     else random_candidate())
            if child.key not in {c.key for c in population}:
                break
        population.append(child)
    run.expect(settings.population * settings.generations)
    run.evaluate(population)
    for _ in range(settings.generations - 1):
        scored = sorted((c for c in population if c.key in run.scores), key=fitness)
        if run.check_stop() is not None or not scored:
            break
        children = scored[:settings.elite]
        while len(children) < settings.population:
            a, b = (min(rng.sample(scored, min(2, len(scored))), key=fitness) for _ in range(2))
            children.append(mutate(crossover(a, b)))
        run.evaluate(children)
        population = children
    return run.result()


STRATEGIES = ("greedy", "thresholds", "evolutionary")
