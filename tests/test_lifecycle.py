"""Process lifecycle against real processes: ``tsptq serve`` stops what it started, and a job
that crashes every dispatcher that runs it is failed after ``TSPTQ_MAX_ATTEMPTS``.

* SIGTERM or SIGINT to ``tsptq serve`` while a job runs: it exits 0, its dispatcher hands the job
  back to the queue (its stored candidates kept) and stops the Ray it started; no process of
  the server remains within 30 s. SIGKILL: the orphaned dispatcher notices and does the same.
  A new dispatcher then finishes the job, reusing every stored candidate.
* A job whose dispatcher is killed (SIGKILL) each time it runs it: after three claims it is failed
  with a message naming the attempts and the last stage, and the next job runs.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from procs import Proc, alive, descendants, free_port, service_env, session_members, title, wait_for

from service.db import upgrade
from service.store import Store

pytestmark = pytest.mark.slow

FAST = {"heartbeat_s": 0.3, "stale_after_s": 1.5, "ray_workers": 1}
# A search long enough to be interrupted: 8 × 20 candidates of the digits ViT.
LONG = {"data": {"calib_size": 8, "val_size": 64, "test_limit": 90},
        "search": {"strategy": "evolutionary", "population": 8, "generations": 20},
        "artifacts": {"plots": False}}
SHORT = {"data": {"calib_size": 8, "val_size": 32, "test_limit": 90},
         "artifacts": {"plots": False}}
STOP_S = 30


def _gone(pids: set[int], sid: int) -> bool:
    return not any(alive(p) for p in pids) and not any(alive(p) for p in session_members(sid))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_serve_stops_what_it_started_and_keeps_the_job(tmp_path, sig):
    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url)
    env = service_env(tmp_path, url, **FAST)
    port = free_port()
    serve = Proc(["serve", "--port", str(port), "--log-level", "info"], env,
                 tmp_path / "serve.log")
    worker = None
    try:
        base = f"http://127.0.0.1:{port}"

        def submitted():
            try:
                return httpx.post(f"{base}/jobs", json=LONG, timeout=5).json()["id"]
            except httpx.TransportError:
                return None

        job_id = wait_for(submitted, 120, "tsptq serve to accept a job", interval=0.3)
        wait_for(lambda: len(store.candidates(job_id)) >= 5, 240, "five stored candidates")
        started = set(descendants(serve.pid)) | {serve.pid}
        assert any("raylet" in title(p) for p in started), "serve's dispatcher started no Ray"
        t0 = time.monotonic()
        os.kill(serve.pid, sig)
        wait_for(lambda: _gone(started, serve.pid), STOP_S,
                 f"every process of tsptq serve to stop after {signal.Signals(sig).name}")
        print(f"{signal.Signals(sig).name}: {len(started)} processes gone in "
              f"{time.monotonic() - t0:.1f} s")
        code = serve.popen.wait(timeout=5)
        if sig != signal.SIGKILL:
            assert code == 0, serve.output()[-3000:]
        job = store.get_job(job_id)
        kept = len(store.candidates(job_id))
        assert job.status == "queued" and job.claims == 0, (job.status, serve.output()[-3000:])
        assert "requeued" in serve.output() and kept >= 5

        worker = Proc.worker(env, tmp_path / "worker.log")  # the job is not lost
        done = wait_for(lambda: (j := store.get_job(job_id)).finished and j, 300,
                        "the requeued job to finish")
        assert done.status == "succeeded", (done.error, worker.output()[-3000:])
        assert done.result["search"]["reused"] >= kept
    finally:
        serve.stop()
        if worker is not None:
            worker.stop()
        store.engine.dispose()


def test_a_job_that_kills_every_dispatcher_is_failed_after_max_attempts(tmp_path):
    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url)
    env = service_env(tmp_path, url, max_attempts=3, **FAST)
    crashing = store.create_job(LONG).id
    after = store.create_job(SHORT).id
    procs = []
    try:
        for attempt in range(1, 4):  # it "crashes" each dispatcher that runs it
            worker = Proc.worker(env, tmp_path / f"worker{attempt}.log")
            procs.append(worker)

            def running_here(w=worker):
                job = store.get_job(crashing)
                return (job.status == "running" and f":{w.pid}:" in (job.claimed_by or "")
                        and job.stage is not None)

            wait_for(running_here, 180, f"dispatcher {attempt} to run the job")
            worker.kill()
            worker.sweep()
            assert store.get_job(crashing).claims == attempt
        last = Proc.worker(env, tmp_path / "worker4.log")
        procs.append(last)
        done = wait_for(lambda: (j := store.get_job(after)).finished and j, 300,
                        "the next job to finish")
        assert done.status == "succeeded", (done.error, last.output()[-3000:])
        failed = store.get_job(crashing)
        assert failed.status == "failed" and failed.claims == 3
        assert "abandoned after 3 attempts" in failed.error
        assert "was at stage" in failed.error and "TSPTQ_MAX_ATTEMPTS" in failed.error
        assert "abandoned after 3 attempts" in last.output()
    finally:
        for p in procs:
            p.stop()
        store.engine.dispose()
