"""MPTQ-ViT's greedy mixed precision on a tiny ViT (sequential; Ray comes with the workers)."""

import pytest
import torch
from conftest import FAST

from quant import Calibrator, QuantConfig
from search.objective import Objective
from search.space import SearchSpace
from search.strategies import Budget, greedy_mixed_precision, pareto_front


@pytest.fixture(scope="module")
def setup(tiny_vit, images):
    base = QuantConfig(**FAST)
    calib, val = images[:8], images[8:]
    calibrator = Calibrator(tiny_vit, calib, base)
    space = SearchSpace.from_model(calibrator.calibrate(base), calib)
    return space, Objective(tiny_vit, calibrator, val, base), calibrator, base, val


def test_greedy_meets_budget_and_is_measured(setup):
    space, objective, calibrator, base, val = setup
    res = greedy_mixed_precision(space, objective, Budget(weight_bits=6, activation_bits=6.5))
    assert res.met_budget and res.stopped_by == "budget"
    assert res.costs["weight_bits"] <= 6 and res.costs["activation_bits"] <= 6.5
    assert any(b < 8 for _, b in res.best.bits)
    again = objective(res.best)  # the reported score is the candidate's measured score
    assert again.kl == pytest.approx(res.score.kl, rel=1e-6)
    costs = [(p["weight_bits"] + p["activation_bits"]) / 2 for p in res.front]
    kls = [p["kl"] for p in res.front]
    assert costs == sorted(costs) and kls == sorted(kls, reverse=True)
    res2 = greedy_mixed_precision(space, objective, Budget(weight_bits=6, activation_bits=6.5))
    assert res2.best.key == res.best.key  # deterministic


def test_greedy_stops_on_max_candidates_and_says_so(setup):
    space, objective, *_ = setup
    res = greedy_mixed_precision(space, objective, Budget(4.0, 4.0), max_candidates=5)
    assert res.stopped_by == "max_candidates" and not res.met_budget
    assert res.evaluations == 5
    assert res.to_dict()["key"] == res.best.key


def test_pareto_front_drops_dominated_points():
    pts = [{"weight_bits": 8, "activation_bits": 8, "kl": 0.1},
           {"weight_bits": 6, "activation_bits": 6, "kl": 0.2},
           {"weight_bits": 7, "activation_bits": 7, "kl": 0.3},  # dominated by the 6-bit point
           {"weight_bits": 4, "activation_bits": 4, "kl": 0.5}]
    front = pareto_front(pts)
    assert [p["weight_bits"] for p in front] == [4, 6, 8]
    assert torch.tensor([p["kl"] for p in front]).diff().lt(0).all()
