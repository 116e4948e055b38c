"""The strategies on a tiny ViT, sequentially (Ray comes with the workers): each meets its
budget or says why not, stops on every criterion, is deterministic, and reuses known scores."""

import pytest
import torch
from conftest import FAST

from quant import Calibrator, QuantConfig
from search.objective import Objective
from search.space import Candidate, SearchSpace
from search.strategies import (
    Budget,
    EvolutionSettings,
    SearchRun,
    StopCriteria,
    evolutionary_search,
    greedy_mixed_precision,
    pareto_front,
    threshold_search,
)

BUDGET = Budget(weight_bits=6, activation_bits=6.5)
SMALL_EVOLUTION = EvolutionSettings(population=4, generations=3, seed=1)


@pytest.fixture(scope="module")
def setup(tiny_vit, images):
    base = QuantConfig(**FAST)
    calib, val = images[:8], images[8:]
    calibrator = Calibrator(tiny_vit, calib, base)
    space = SearchSpace.from_model(calibrator.calibrate(base), calib)
    return space, Objective(tiny_vit, calibrator, val, base)


@pytest.fixture(scope="module")
def small_space(setup):
    """Only two tunable quantizers, so the threshold search stays short."""
    space, _ = setup
    keep = {"blocks.0.attn.a_q", "blocks.1.norm1.input_q"}
    slots = {n: (s if n in keep else type(s)(s.name, s.kind, s.scheme, s.bits, s.elements))
             for n, s in space.slots.items()}
    assert all(slots[n].params for n in keep)
    return SearchSpace(space.base, slots, space.macs)


def check_measured(res, objective):
    again = objective(res.best)  # the reported score is the candidate's measured score
    assert again.kl == pytest.approx(res.score.kl, rel=1e-6)
    costs = [(p["weight_bits"] + p["activation_bits"]) / 2 for p in res.front]
    kls = [p["kl"] for p in res.front]
    assert costs == sorted(costs) and kls == sorted(kls, reverse=True)


def test_greedy_meets_budget_and_is_measured(setup):
    space, objective = setup
    res = greedy_mixed_precision(SearchRun(space, objective, BUDGET))
    assert res.met_budget and res.stopped_by == "budget" and res.target_met is None
    assert res.costs["weight_bits"] <= 6 and res.costs["activation_bits"] <= 6.5
    assert any(b < 8 for _, b in res.best.bits)
    check_measured(res, objective)
    again = greedy_mixed_precision(SearchRun(space, objective, BUDGET))
    assert again.best.key == res.best.key  # deterministic


def test_greedy_stops_on_max_candidates_and_says_so(setup):
    space, objective = setup
    res = greedy_mixed_precision(SearchRun(space, objective, Budget(4.0, 4.0),
                                           StopCriteria(max_candidates=5)))
    assert res.stopped_by == "max_candidates" and not res.met_budget
    assert res.evaluations == 5
    assert "does not meet the budget" in res.message
    assert res.to_dict()["key"] == res.best.key


def test_time_budget_stops_a_search(setup):
    space, objective = setup
    res = evolutionary_search(SearchRun(space, objective, BUDGET, StopCriteria(time_budget_s=0)),
                              SMALL_EVOLUTION)
    assert res.stopped_by == "time_budget"
    assert res.evaluations == SMALL_EVOLUTION.population  # one generation, then it stops


def test_threshold_search_never_worsens_and_pins_parameters(setup, small_space):
    _, objective = setup
    start = Candidate.make({"blocks.0.attn.a_q": 4, "blocks.1.norm1.input_q": 4})
    run = SearchRun(small_space, objective, Budget())
    res = threshold_search(run, start)
    assert dict(res.best.bits) == dict(start.bits)  # widths are left alone
    assert res.score.kl <= objective(start).kl
    n_options = sum(len(s.options()) for s in small_space.slots.values() if s.params)
    assert res.evaluations <= 1 + n_options
    assert set(dict(res.best.pinned)) <= {"blocks.0.attn.a_q", "blocks.1.norm1.input_q"}
    check_measured(res, objective)


def test_evolutionary_meets_budget_is_deterministic_and_improves_on_its_seeds(setup):
    space, objective = setup
    greedy = greedy_mixed_precision(SearchRun(space, objective, BUDGET))
    results = [evolutionary_search(SearchRun(space, objective, BUDGET), SMALL_EVOLUTION,
                                   seeds=[greedy.best]) for _ in range(2)]
    res = results[0]
    assert res.met_budget and res.score.kl <= greedy.score.kl
    assert res.best.key == results[1].best.key
    assert [p["key"] for p in res.front] == [p["key"] for p in results[1].front]
    assert res.evaluations <= SMALL_EVOLUTION.population * SMALL_EVOLUTION.generations
    check_measured(res, objective)
    other = evolutionary_search(SearchRun(space, objective, BUDGET),
                                EvolutionSettings(population=4, generations=3, seed=2))
    assert other.met_budget


def test_evolution_starts_from_mutants_of_its_seeds(setup):
    """With a seed, the first generation is the seed and its mutants, each a few genes away
    (at the default rate, 1 / the number of genes), not random candidates."""
    space, objective = setup
    seed = greedy_mixed_precision(SearchRun(space, objective, BUDGET)).best
    run = SearchRun(space, objective, BUDGET)
    evolutionary_search(run, EvolutionSettings(population=6, generations=1, seed=3), seeds=[seed])
    firsts = [c for c, _ in run.scores.values()]
    assert len(firsts) == 6 and seed.key in {c.key for c in firsts}
    base = space.bits_of(seed)
    for c in firsts:
        bits = space.bits_of(c)
        changed = sum(bits[n] != base[n] for n in bits) + len(set(c.pinned) ^ set(seed.pinned))
        assert c.key == seed.key or 1 <= changed <= 4, changed


def test_accuracy_target_stops_early_or_says_it_was_missed(setup):
    space, objective = setup
    reached = evolutionary_search(SearchRun(space, objective, BUDGET,
                                            StopCriteria(target_agreement=0.0)), SMALL_EVOLUTION)
    assert reached.stopped_by == "target" and reached.target_met
    assert reached.evaluations == SMALL_EVOLUTION.population
    missed = greedy_mixed_precision(SearchRun(space, objective, BUDGET,
                                              StopCriteria(target_agreement=1.01)))
    assert missed.target_met is False and missed.met_budget
    assert "target was not reached" in missed.message


def test_known_scores_are_reused_not_recomputed(setup):
    space, objective = setup
    seen = []
    first = greedy_mixed_precision(SearchRun(space, objective, BUDGET,
                                             on_scored=lambda i, c, s: seen.append((c.key, s))))
    assert len(seen) == first.evaluations
    known = dict(seen[: len(seen) // 2])
    calls = []

    def counting(c):
        calls.append(c.key)
        return objective(c)

    progress = []
    resumed = greedy_mixed_precision(SearchRun(space, counting, BUDGET, known=known,
                                               progress=lambda d, t: progress.append((d, t))))
    assert resumed.best.key == first.best.key
    assert resumed.reused == len(known) and not set(calls) & set(known)
    assert resumed.evaluations == first.evaluations - len(known)
    done, total = progress[-1]
    assert done == total == first.evaluations


def test_pareto_front_drops_dominated_points():
    pts = [{"weight_bits": 8, "activation_bits": 8, "kl": 0.1},
           {"weight_bits": 6, "activation_bits": 6, "kl": 0.2},
           {"weight_bits": 7, "activation_bits": 7, "kl": 0.3},  # dominated by the 6-bit point
           {"weight_bits": 4, "activation_bits": 4, "kl": 0.5}]
    front = pareto_front(pts)
    assert [p["weight_bits"] for p in front] == [4, 6, 8]
    assert torch.tensor([p["kl"] for p in front]).diff().lt(0).all()


def test_greedy_meets_byte_and_bitops_budgets(setup):
    space, objective = setup
    base = Candidate.make()
    budget = Budget(weight_bytes=0.7 * space.weight_bytes(base),
                    bitops=0.6 * space.bitops(base))
    res = greedy_mixed_precision(SearchRun(space, objective, budget))
    assert res.met_budget and budget.excess(space, res.best) == 0
    assert res.costs["weight_bytes"] <= budget.weight_bytes
    assert res.costs["bitops"] <= budget.bitops
    assert budget.excess(space, base) > 0 and budget.over(space, base) == (True, True)
