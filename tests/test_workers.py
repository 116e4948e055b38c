"""Scoring candidates on Ray: same scores as in-process, any worker count, retries, cancel."""

import os
import signal

import pytest
import ray
import torch
from conftest import FAST

from quant import Calibrator, QuantConfig
from search.objective import Objective, Score
from search.space import Candidate, SearchSpace
from search.strategies import (
    Budget,
    EvolutionSettings,
    Prefetch,
    SearchCancelled,
    SearchRun,
    evolutionary_search,
    greedy_mixed_precision,
)
from workers.evaluator import EvaluatorPool, JobContext


@pytest.fixture(scope="module")
def ray_local():
    # Another module (search.run, the dispatcher) may have started this process's Ray already.
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture(scope="module")
def job(tiny_vit, images):
    base = QuantConfig(**FAST)
    calibrator = Calibrator(tiny_vit, images[:8], base)
    return JobContext(tiny_vit, calibrator, images[8:], base)


CANDIDATES = [Candidate(), Candidate.make({"blocks.0.attn.qkv.weight_q": 4}),
              Candidate.make({"blocks.1.mlp.fc2.input_q": 4}),
              Candidate.make({"blocks.0.attn.a_q": 5}, {"blocks.0.attn.a_q": {"shift": 2}})]


def test_pool_scores_equal_in_process_scores(ray_local, job):
    local = Objective(job.model, job.calibrator, job.val_images, job.base)
    expected = [local(c) for c in CANDIDATES]
    for workers in (1, 2):
        pool = EvaluatorPool(job, workers)
        try:
            assert pool.map(CANDIDATES) == expected
        finally:
            pool.shutdown()


def test_search_result_does_not_depend_on_worker_count(ray_local, job):
    """Nor on the candidates 2 workers score ahead (greedy's hints): every stored candidate,
    in the same order with the same score, and the same best and front."""
    space = SearchSpace.from_model(job.calibrator.calibrate(job.base), job.val_images)
    keys, scored, ahead = [], [], []
    for workers in (1, 2):
        pool = EvaluatorPool(job, workers)
        seen = []
        try:
            greedy = greedy_mixed_precision(SearchRun(
                space, pool, Budget(6.5, 7.0), evaluate_many=pool.map,
                on_scored=lambda seq, c, s: seen.append((seq, c.key, s))))  # noqa: B023
            ahead.append(pool.ahead_used)
            evo = evolutionary_search(SearchRun(space, pool, Budget(6.5, 7.0),
                                                evaluate_many=pool.map),
                                      EvolutionSettings(population=4, generations=2))
        finally:
            pool.shutdown()
        keys.append([(r.best.key, [p["key"] for p in r.front]) for r in (greedy, evo)])
        scored.append(sorted(seen))
    assert keys[0] == keys[1]
    assert scored[0] == scored[1]
    assert ahead[0] == 0 and ahead[1] > 0  # the second worker did score greedy steps ahead


def test_a_search_is_handed_on_when_made_not_when_its_score_returns(ray_local, tiny_vit,
                                                                   images):
    """A greedy step's scored-ahead candidate takes both of the step's layers: started while
    the other actor still measures its own candidate, it searches only its other layer."""
    base = QuantConfig(**FAST)
    job = JobContext(tiny_vit, Calibrator(tiny_vit, images[:8], base), images[8:], base)
    pool = EvaluatorPool(job, 2)
    try:
        pool.warm_up()
        first, other = pool._idle[:2]
        before = pool.module_searches()
        one = Candidate.make({"blocks.0.attn.qkv.weight_q": 4})
        both = Candidate.make({"blocks.0.attn.qkv.weight_q": 4, "blocks.1.mlp.fc2.input_q": 4})
        pool._submit(one)
        (searched,) = pool._searched
        # Until it is handed on, a candidate that needs the same search waits for it, others not.
        assert pool._searching_for(both)
        assert not pool._searching_for(Candidate.make({"blocks.1.mlp.fc2.input_q": 4}))
        measured = next(iter(pool._tasks))
        ray.wait([searched])
        pool._hand_on(searched)  # what map does as soon as the calibrate half is ready
        assert not pool._searching_for(both)
        assert pool._inbox[other] and not pool._inbox[first]
        pool._submit(both)  # on the other actor
        assert ray.get(measured) is not None and len(ray.get(list(pool._tasks))) == 2
        after = pool.module_searches()
        assert [after[first] - before[first], after[other] - before[other]] == [1, 1]
        expected = Objective(job.model, job.calibrator, job.val_images, job.base)
        assert [Score(*ray.get(ref)) for ref in pool._tasks] == [expected(one), expected(both)]
    finally:
        pool.shutdown()


def test_an_idle_actor_makes_a_hinted_search_ahead(ray_local, tiny_vit, images):
    """``Prefetch.search``: an actor with nothing to score makes a hinted candidate's module
    search (its calibrate half only) and hands it on; a candidate asked for later that
    changes that module alike searches nothing, on either actor, and scores the same."""
    base = QuantConfig(**FAST)
    job = JobContext(tiny_vit, Calibrator(tiny_vit, images[:8], base), images[8:], base)
    pool = EvaluatorPool(job, 2)
    try:
        pool.warm_up()
        before = sum(pool.module_searches())
        one = Candidate.make({"blocks.0.attn.qkv.weight_q": 4})
        hinted = Candidate.make({"blocks.1.mlp.fc2.input_q": 4})
        later = Candidate.make({"blocks.0.attn.qkv.weight_q": 4, "blocks.1.mlp.fc2.input_q": 4})
        (score_one,) = pool.map([one], prefetch=Prefetch(search=[hinted]))
        assert pool.searched_ahead == 1 and pool.ahead_scored == 0
        (score_later,) = pool.map([later])  # waits for the search ahead if still in flight
        assert sum(pool.module_searches()) - before == 2  # qkv and fc2, each once
        # A hint whose searches are made already is dropped, not run.
        pool.map([one], prefetch=Prefetch(search=[later]))
        assert pool.searched_ahead == 1
        expected = Objective(job.model, job.calibrator, job.val_images, job.base)
        assert [score_one, score_later] == [expected(one), expected(later)]
    finally:
        pool.shutdown()


def test_an_actor_lost_for_good_is_replaced_and_its_task_rescored(ray_local, job):
    pool = EvaluatorPool(job, 2)
    try:
        expected = pool.map(CANDIDATES)
        pool.shutdown()
        pool = EvaluatorPool(job, 2)
        killed = []

        def done(i, score):  # once a first candidate is in, one actor dies for good
            if not killed:
                killed.append(ray.kill(pool.actors[0], no_restart=True))

        assert pool.map(CANDIDATES, done=done) == expected
        assert killed and len(pool.actors) == 3  # a fresh actor took the dead one's place
        assert pool.map(CANDIDATES[:2]) == expected[:2]
    finally:
        pool.shutdown()


def test_killed_worker_is_restarted_and_its_task_retried(ray_local, job):
    pool = EvaluatorPool(job, 1)
    try:
        expected = pool.map(CANDIDATES[:2])
        os.kill(ray.get(pool.actors[0].ping.remote()), signal.SIGKILL)
        assert pool.map(CANDIDATES[:2]) == expected
    finally:
        pool.shutdown()


def test_cancel_stops_the_map(ray_local, job):
    pool = EvaluatorPool(job, 1)
    calls = []

    def done(i, score):
        calls.append(i)
        pool.cancel()

    try:
        with pytest.raises(SearchCancelled):
            pool.map(CANDIDATES, done=done)
        assert len(calls) == 1
    finally:
        pool.shutdown()
    assert torch.is_tensor(job.val_images)


def test_search_benchmark_reports_each_runs_searches_and_cpu(ray_local, job):
    """bench.search's per-run details: what tells a slow run on a shared machine from slower
    code (the same searches and CPU seconds, more stolen time)."""
    from bench.search import timed_search

    space = SearchSpace.from_model(job.calibrator.calibrate(job.base), job.val_images)
    details: list[dict] = []
    result, _, secs = timed_search(job, space, Budget(6.5, 7.0), 2, details=details)
    (info,) = details
    assert len(info["module_searches"]) == 2 and sum(info["module_searches"]) > 0
    assert info["actor_cpu_s"] > 0 and info["steal_s"] >= 0 and info["actor_page_faults"] >= 0
    assert result.evaluations > 0 and secs > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_an_actor_reuses_its_pages_from_one_score_to_the_next(ray_local):
    """A scoring actor keeps the memory a forward pass frees (``workers.memory``): with
    glibc's defaults each of its validation passes faulted in fresh pages (the kernel zeroing
    each one), which made the pass 1.4-2x slower in an actor than in a process that had
    calibrated. The digits ViT on 256 validation images: ~31,700 pages (124 MiB) per score
    without the setting, ~130 with it."""
    from bench.search import minor_faults
    from quant.zoo.data import digits_data
    from quant.zoo.models import load_model

    model, base = load_model("digits_vit"), QuantConfig(**FAST)
    data = digits_data(8, 0, val_size=256)
    pool = EvaluatorPool(JobContext(model, Calibrator(model, data.calib, base), data.x_val,
                                    base), 1)
    try:
        pool.warm_up()
        pid = ray.get(pool.actors[0].ping.remote())
        pool(Candidate())
        before = minor_faults(pid)
        for _ in range(4):
            pool(Candidate())
        per_score = (minor_faults(pid) - before) / 4
    finally:
        pool.shutdown()
    assert per_score < 3000, f"{per_score:.0f} pages faulted in per score"
