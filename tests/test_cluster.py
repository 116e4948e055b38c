"""On a real multi-node Ray cluster (``bench.cluster``): a head and worker nodes, each its own
raylet and object store with one CPU, all on 127.0.0.1.

(a) ``search.run`` joins the cluster through ``RAY_ADDRESS``: the job's scoring actors run on
    both nodes (Ray's state API says so), every process of the cluster listens on loopback
    only, and the result is the single-process run's.
(b) A worker node's raylet killed while a greedy search scores: the job (a ``tsptq worker``
    dispatcher on the cluster) completes on the remaining node with the undisturbed result, and
    every candidate is stored once.
(c) The head lost mid-search: the dispatcher hands the job back to the queue, claims nothing
    while the head is gone, and once a new head answers at the same address it resumes the
    job from its stored candidates.
(d) Two jobs submitted together to two dispatchers on one cluster, one actor each
    (``TSPTQ_RAY_WORKERS=1``): both progress at once.

The search is one small greedy job (digits ViT, 8 calibration and 32 validation images); its
single-process result (a local Ray, one worker) is computed once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster import cluster_processes, is_loopback, listening_addresses
from procs import REPO, Proc, service_env, wait_for
from ray.util.state import list_actors
from test_faults import essence, finished

from bench.cluster import RayCluster, ray_cluster, start_cluster
from service.db import upgrade
from service.jobspec import JobSpec
from service.store import Store

pytestmark = pytest.mark.slow

ARGS = dict(calib_size=8, val_size=32, test_limit=60)
BUDGET = 6.0
SPEC = JobSpec.model_validate({
    "data": ARGS,
    "search": {"strategy": "greedy", "budget_weight_bits": BUDGET,
               "budget_activation_bits": BUDGET},
    "artifacts": {"plots": False},
}).model_dump(mode="json")
FAST = {"heartbeat_s": 0.3, "stale_after_s": 1.5}
JOB_TIMEOUT = 300
ACTOR = "CandidateEvaluator"


def search_run(tmp: Path, workers: int, ray_address: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    args = [sys.executable, "-m", "search.run", "--strategy", "greedy", "--budget-bits",
            str(BUDGET), "--workers", str(workers), "--json", str(tmp / "report.json"),
            *[f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]]
    log = open(tmp / "search.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def front_keys(report: dict) -> list[str]:
    return [p["key"] for p in report["pareto_front"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The single-process run: a local Ray of its own, one worker."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = search_run(tmp, workers=1)
    assert proc.wait(timeout=JOB_TIMEOUT) == 0, (tmp / "search.log").read_text()[-3000:]
    return json.loads((tmp / "report.json").read_text())


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(worker_nodes=1) as c:
        yield c


def actors(c: RayCluster, state: str | None = None) -> list:
    filters = [("class_name", "=", ACTOR)] + ([("state", "=", state)] if state else [])
    return list_actors(address=c.dashboard, filters=filters, detail=True, limit=1000)


def test_a_search_on_two_nodes_gives_the_single_process_result(cluster, reference, tmp_path):
    proc = search_run(tmp_path, workers=2, ray_address=cluster.address)
    try:
        alive = wait_for(lambda: len({a.node_id for a in actors(cluster, "ALIVE")}) == 2
                         and actors(cluster, "ALIVE"), JOB_TIMEOUT, "actors on both nodes",
                         interval=0.2)
        # Every process of the cluster and of the driver, actors included, listens on loopback.
        procs = [*cluster_processes(cluster), psutil.Process(proc.pid)]
        addresses = listening_addresses(procs)
        assert addresses and all(is_loopback(a) for a in addresses), addresses
        assert proc.wait(timeout=JOB_TIMEOUT) == 0, (tmp_path / "search.log").read_text()[-3000:]
    finally:
        proc.kill()
    assert {a.node_id for a in alive} == cluster.node_ids()
    report = json.loads((tmp_path / "report.json").read_text())
    assert essence(report["result"]) == essence(reference["result"])
    assert front_keys(report) == front_keys(reference)
    assert report["result"]["search"]["evaluations"] == \
        reference["result"]["search"]["evaluations"]


def test_a_local_ray_listens_on_loopback_only():
    """The local Ray every other test (and ``tsptq serve``) starts, under conftest's setting."""
    code = ("from workers.evaluator import ensure_ray; import ray, time; ensure_ray(2); "
            "print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        root = psutil.Process(proc.pid)
        addresses = listening_addresses([root, *root.children(recursive=True)])
        assert addresses and all(is_loopback(a) for a in addresses), addresses
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def dispatcher(tmp: Path, c: RayCluster, url: str, name: str = "worker",
               workers: int = 2) -> Proc:
    env = service_env(tmp, url, ray_workers=workers, **FAST)
    env["RAY_ADDRESS"] = c.address
    return Proc.worker(env, tmp / f"{name}.log")


def store_at(tmp: Path) -> tuple[Store, str]:
    url = f"sqlite:///{tmp / 'tsptq.db'}"
    upgrade(url)
    return Store.from_url(url), url


def assert_stored_once(store: Store, job_id: str, result: dict) -> None:
    rows = store.candidates(job_id)
    assert len({r.key for r in rows}) == len({r.seq for r in rows}) == len(rows)
    search = result["search"]
    assert len(rows) == search["evaluations"] + search["reused"]


def test_b_a_node_lost_mid_search(cluster, reference, tmp_path):
    store, url = store_at(tmp_path)
    worker = dispatcher(tmp_path, cluster, url)
    try:
        job = store.create_job(SPEC)
        victim = cluster.workers[0]
        wait_for(lambda: any(a.node_id == victim.node_id for a in actors(cluster, "ALIVE"))
                 and len(store.candidates(job.id)) >= 20, JOB_TIMEOUT,
                 "an actor on the worker node and 20 stored candidates", interval=0.1)
        assert not finished(store, job.id)
        cluster.kill_raylet(victim)
        scored_before = len(store.candidates(job.id))
        done = wait_for(lambda: finished(store, job.id), JOB_TIMEOUT, "the job")
        assert done.status == "succeeded", (done.error, worker.output()[-3000:])
        assert scored_before < done.result["search"]["evaluations"]
        assert done.claims == 1
        assert essence(done.result) == essence(reference["result"])
        assert done.result["search"]["evaluations"] == \
            reference["result"]["search"]["evaluations"]
        assert_stored_once(store, job.id, done.result)
        # The lost node's actor is dead; the search finished on the head's.
        dead = [a for a in actors(cluster) if a.node_id == victim.node_id]
        assert dead and all(a.state == "DEAD" for a in dead)
        print(f"\n(b) worker node's raylet killed after {scored_before} of "
              f"{done.result['search']['evaluations']} candidates; the job succeeded on the "
              f"head's actor with the undisturbed result, {len(store.candidates(job.id))} "
              "candidates stored once each")
    finally:
        worker.stop()
        store.engine.dispose()


def test_c_the_head_lost_and_back(cluster, reference, tmp_path):
    store, url = store_at(tmp_path)
    worker = dispatcher(tmp_path, cluster, url)
    again = None
    try:
        job = store.create_job(SPEC)
        wait_for(lambda: len(store.candidates(job.id)) >= 20, JOB_TIMEOUT,
                 "20 stored candidates", interval=0.1)
        cluster.kill_head()
        t0 = time.monotonic()
        queued = wait_for(lambda: (j := store.get_job(job.id)).status == "queued" and j,
                          90, "the job back in the queue")
        handed_back_s = time.monotonic() - t0
        stored = {c.key: (c.id, c.kl) for c in store.candidates(job.id)}
        assert queued.claims == 0 and stored
        # It leaves the cluster (ray.shutdown takes ~16 s without a head), then waits for it.
        wait_for(lambda: "is unreachable; claiming no job" in worker.output(), 90,
                 "the dispatcher waiting for the head")
        time.sleep(2)  # the head is still gone: the dispatcher claims nothing, and lives
        assert store.get_job(job.id).status == "queued" and worker.running()
        again = start_cluster(worker_nodes=1, gcs_port=cluster.gcs_port,
                              dashboard_port=cluster.dashboard_port)
        done = wait_for(lambda: finished(store, job.id), JOB_TIMEOUT, "the resumed job")
        assert done.status == "succeeded", (done.error, worker.output()[-3000:])
        assert done.result["search"]["reused"] >= len(stored)
        assert essence(done.result) == essence(reference["result"])
        assert_stored_once(store, job.id, done.result)
        after = {c.key: (c.id, c.kl) for c in store.candidates(job.id)}
        assert {k: after[k] for k in stored} == stored  # kept as they were, not recomputed
        print(f"\n(c) head killed after {len(stored)} candidates; job queued again in "
              f"{handed_back_s:.1f} s; resumed on the new head with {len(stored)} reused")
    finally:
        worker.stop()
        store.engine.dispose()
        if again is not None:
            again.stop()


def test_d_two_jobs_side_by_side(cluster, tmp_path):
    store, url = store_at(tmp_path)
    workers = [dispatcher(tmp_path, cluster, url, f"worker{i}", workers=1) for i in (1, 2)]
    try:
        jobs = [store.create_job(SPEC) for _ in range(2)]
        done = [wait_for(lambda j=j: finished(store, j.id), JOB_TIMEOUT, "a job") for j in jobs]
        assert [d.status for d in done] == ["succeeded"] * 2, [d.error for d in done]
        assert all(": claimed by" in w.output() for w in workers)  # one job each
        spans = [(min(c.created_at for c in store.candidates(j.id)),
                  max(c.created_at for c in store.candidates(j.id))) for j in jobs]
        # Neither waited for the other: each stored candidates while the other did.
        assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
        overlap = min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0])
        print(f"\n(d) two jobs, two dispatchers, one actor each: both stored candidates for "
              f"{overlap.total_seconds():.1f} s at the same time")
        assert essence(done[0].result) == essence(done[1].result)
    finally:
        for w in workers:
            w.stop()
        store.engine.dispose()
