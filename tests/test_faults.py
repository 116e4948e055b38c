"""Faults against real processes: the service loses no job and no finished work.

(a) A Ray actor process killed while it scores a candidate: the pool hands the task to the next
    ready actor (Ray restarts the killed one); the job succeeds with the result of an
    undisturbed run.
(b) The dispatcher (``tsptq worker``) killed mid-search: a new dispatcher requeues the stale job
    and resumes it without recomputing the candidates already stored; same result.
(c) The API (``tsptq serve --api-only``) killed and restarted while a job runs: the job, run by
    a separate dispatcher, goes on; the new API reports it right.
(d) The database cut off (a TCP proxy between the API and PostgreSQL closes every connection
    and refuses new ones): the API answers 503 with a message meanwhile and 200 afterwards,
    without a restart.

The search in (a)-(c) is the same small job (digits ViT, threshold search, 8 candidates, no
plots); its undisturbed result is computed once per module by a dispatcher of its own.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from procs import (
    Proc,
    TcpProxy,
    descendants,
    free_port,
    pg_database,
    service_env,
    title,
    wait_for,
    wait_healthy,
)
from sqlalchemy.engine import make_url

from service.client import ServiceClient, ServiceError
from service.db import make_engine, upgrade
from service.jobspec import JobSpec
from service.store import Store

pytestmark = pytest.mark.slow

SPEC = JobSpec.model_validate({
    "data": {"calib_size": 8, "val_size": 64, "test_limit": 90},
    "search": {"strategy": "thresholds", "max_candidates": 8},
    "artifacts": {"plots": False},
}).model_dump(mode="json")
FAST = {"heartbeat_s": 0.3, "stale_after_s": 1.5}
JOB_TIMEOUT = 240
ACTOR = "ray::CandidateEvaluator"
BUSY = tuple(f"{ACTOR}.{task}" for task in ("calibrate", "measure", "score"))  # a task's title


def essence(result: dict) -> dict:
    """The result without what depends on the run rather than on the job: times, how many
    candidates this run evaluated rather than reused, and the checkpoint's size (its recipe
    records the calibration time, so its length varies by a few bytes)."""
    out = copy.deepcopy(result)
    for key in ("size_bytes", "compression"):
        out.pop(key)
    for key in ("seconds", "evaluations", "reused", "message"):
        out["search"].pop(key, None)
    return out


def rows(store: Store, job_id: str) -> list[tuple]:
    return [(c.seq, c.key, c.kl, c.agreement) for c in store.candidates(job_id)]


def finished(store: Store, job_id: str):
    job = store.get_job(job_id)
    return job if job is not None and job.finished else None


@dataclass
class Module:
    """A dispatcher with two Ray actors per job, on a SQLite database of its own, and the
    undisturbed run of ``SPEC`` it made first."""

    store: Store
    worker: Proc
    reference: dict
    candidates: list[tuple]


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> Iterator[Module]:
    tmp = tmp_path_factory.mktemp("faults")
    url = f"sqlite:///{tmp / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url)
    worker = Proc.worker(service_env(tmp, url, ray_workers=2, **FAST), tmp / "worker.log")
    try:
        job = store.create_job(SPEC)
        done = wait_for(lambda: finished(store, job.id), JOB_TIMEOUT, "the reference job")
        assert done.status == "succeeded", (done.error, worker.output()[-3000:])
        assert done.result["search"]["evaluations"] == 8
        yield Module(store, worker, done.result, rows(store, job.id))
    finally:
        worker.stop()
        store.engine.dispose()


def test_a_ray_actor_killed_while_scoring(module):
    store, worker = module.store, module.worker
    job = store.create_job(SPEC)
    wait_for(lambda: store.candidates(job.id), JOB_TIMEOUT, "the first candidate",
             interval=0.02)

    def busy_actor() -> tuple[int, str] | None:
        assert not finished(store, job.id), "the search ended before an actor could be killed"
        for pid in descendants(worker.pid):
            # A task (``score``, or its two halves ``calibrate`` and ``measure``) retitles it.
            if title(pid).startswith(BUSY):
                return pid, title(pid)
        return None

    victim, victim_title = wait_for(busy_actor, 30, "an actor scoring a candidate",
                                    interval=0.005)
    actors_before = {p for p in descendants(worker.pid) if title(p).startswith(ACTOR)}
    scored_before = len(store.candidates(job.id))
    os.kill(victim, signal.SIGKILL)

    # The pool gives the lost task to the other actor; Ray restarts the killed one
    # (max_restarts) in a new process, which may come up only after the 8 candidates are done.
    restarted: set[int] = set()

    def done_watching_restarts():
        restarted.update(p for p in descendants(worker.pid)
                         if p not in actors_before and title(p).startswith(ACTOR))
        return finished(store, job.id)

    final = wait_for(done_watching_restarts, JOB_TIMEOUT, "the job", interval=0.05)
    assert final.status == "succeeded", (final.error, worker.output()[-3000:])
    assert victim not in descendants(worker.pid)
    assert final.claims == 1 and scored_before < 8
    assert essence(final.result) == essence(module.reference)
    assert final.result["search"]["evaluations"] == 8
    assert rows(store, job.id) == module.candidates
    print(f"\n(a) killed actor pid {victim} ({victim_title!r}) after {scored_before} of 8 "
          f"candidates; restarted actor pid(s) {sorted(restarted)}; job succeeded, result "
          "equal to the undisturbed run")


def test_b_dispatcher_killed_mid_search(module, tmp_path):
    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url)
    env = service_env(tmp_path, url, ray_workers=1, **FAST)
    first = Proc.worker(env, tmp_path / "worker1.log")
    second = None
    try:
        job = store.create_job(SPEC)
        wait_for(lambda: len(store.candidates(job.id)) >= 3, JOB_TIMEOUT,
                 "three stored candidates", interval=0.02)
        first.kill()  # SIGKILL the dispatcher mid-search
        first.sweep()  # its local Ray goes with it (Ray's processes share its fate)
        stored = store.candidates(job.id)
        killed = store.get_job(job.id)
        assert killed.status == "running" and killed.claims == 1 and 3 <= len(stored) < 8

        second = Proc.worker(env, tmp_path / "worker2.log")
        final = wait_for(lambda: finished(store, job.id), JOB_TIMEOUT, "the resumed job")
        assert final.status == "succeeded", (final.error, second.output()[-3000:])
        assert final.claims == 2
        search = final.result["search"]
        assert search["reused"] == len(stored) and search["evaluations"] == 8 - len(stored)
        after = store.candidates(job.id)
        # Nothing lost, nothing recomputed: the rows stored before the kill are still there,
        # untouched; every candidate is stored once.
        assert {c.id: (c.key, c.kl, c.created_at) for c in stored}.items() <= \
            {c.id: (c.key, c.kl, c.created_at) for c in after}.items()
        assert len({c.key for c in after}) == len({c.seq for c in after}) == len(after) == 8
        assert essence(final.result) == essence(module.reference)
        assert rows(store, job.id) == module.candidates
        names = [a.name for a in store.artifacts(job.id)]
        assert sorted(names) == sorted(set(names)) and "report.json" in names
        log = second.output()
        assert f"job {job.id}: its dispatcher stopped heartbeating; requeued" in log
        assert f"job {job.id}: resuming with {len(stored)} candidates already scored" in log
        print(f"\n(b) dispatcher killed after {len(stored)} of 8 candidates; the new dispatcher "
              f"reused {search['reused']}, evaluated {search['evaluations']}; result equal "
              "to the undisturbed run")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        store.engine.dispose()


def test_c_api_killed_and_restarted_while_a_job_runs(module, tmp_path):
    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url)
    env = service_env(tmp_path, url, ray_workers=1, **FAST)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = Proc.api(port, env, tmp_path / "api1.log")
    worker = Proc.worker(env, tmp_path / "worker.log")
    api2 = None
    client = ServiceClient(base, timeout=30)
    try:
        wait_healthy(base, api)
        job_id = client.submit(SPEC)["id"]
        wait_for(lambda: client.job(job_id)["status"] == "running", JOB_TIMEOUT,
                 "the job to run")
        api.kill()  # SIGKILL the API while the job runs
        with pytest.raises(ServiceError) as e:
            client.job(job_id)
        assert e.value.status is None  # nobody answers
        beat = store.get_job(job_id).heartbeat_at
        # The dispatcher is another process: the job goes on without the API.
        wait_for(lambda: (j := store.get_job(job_id)).finished or j.heartbeat_at > beat, 30,
                 "the dispatcher to go on")

        api2 = Proc.api(port, env, tmp_path / "api2.log")
        wait_healthy(base, api2)
        seen = client.job(job_id)["status"]
        assert seen in ("running", "succeeded")
        final = client.wait(job_id, poll_s=0.3, timeout_s=JOB_TIMEOUT)
        assert final["status"] == "succeeded", (final["error"], worker.output()[-3000:])
        assert final["claims"] == 1  # never interrupted, never requeued
        assert final["progress"]["done"] == final["progress"]["total"] == 8
        assert essence(final["result"]) == essence(module.reference)
        listed = client.jobs()
        assert [(j["id"], j["status"]) for j in listed["items"]] == [(job_id, "succeeded")]
        ckpt = next(a for a in client.artifacts(job_id) if a["kind"] == "checkpoint")
        client.download(ckpt, tmp_path / "ckpt.safetensors")  # size and sha256 checked
        print(f"\n(c) API killed while the job ran; status through the restarted API: {seen}, "
              f"then succeeded with claims=1 and the undisturbed result")
    finally:
        client.close()
        for proc in (api, worker, api2):
            if proc is not None:
                proc.stop()
        store.engine.dispose()


def test_d_database_cut_off_then_back(tmp_path):
    with pg_database() as direct_url:
        upgrade(direct_url)
        # pool_pre_ping: a pooled connection the database dropped is replaced on checkout.
        engine = make_engine(direct_url)
        assert engine.pool._pre_ping
        engine.dispose()
        direct = make_url(direct_url)
        proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432)).start()
        url = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api = Proc.api(port, service_env(tmp_path, url), tmp_path / "api.log")
        http = httpx.Client(base_url=base, timeout=30)
        try:
            wait_healthy(base, api)
            job_id = http.post("/jobs", json={}).json()["id"]
            assert http.get("/jobs").json()["total"] == 1

            proxy.cut()
            calls = [("GET", "/healthz", None), ("GET", "/jobs", None),
                     ("GET", f"/jobs/{job_id}", None), ("POST", "/jobs", {}),
                     ("DELETE", f"/jobs/{job_id}", None)]
            answered, slowest = 0, 0.0
            outage_ends = time.monotonic() + 4
            while time.monotonic() < outage_ends:
                for method, path, body in calls:
                    t0 = time.monotonic()
                    r = http.request(method, path, json=body)
                    slowest = max(slowest, time.monotonic() - t0)
                    assert r.status_code == 503, (method, path, r.text)
                    detail = r.json()["detail"]
                    assert detail.startswith("database") and detail.endswith("retry later")
                    assert r.headers["retry-after"] == "5"
                    answered += 1
                time.sleep(0.2)
            assert slowest < 5  # refused at once, not hung

            proxy.restore()
            # Recovered by itself: the first requests after the outage succeed.
            assert http.get("/healthz").status_code == 200
            page = http.get("/jobs").json()
            assert page["total"] == 1  # nothing was stored (or cancelled) during the outage
            assert page["items"][0]["id"] == job_id
            assert page["items"][0]["status"] == "queued"
            assert http.post("/jobs", json={}).status_code == 202
            assert http.get("/jobs").json()["total"] == 2
            assert api.running()  # no restart
            print(f"\n(d) {answered} requests during a 4 s outage: all 503 with a message "
                  f"(slowest {slowest * 1000:.0f} ms); first requests after it: 200")
        finally:
            http.close()
            api.stop()
            proxy.close()
