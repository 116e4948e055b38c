"""Two dispatchers (``tsptq worker`` processes) on one PostgreSQL database and 20 jobs queued at
once: every job finishes, and none runs twice (each is claimed exactly once, by one of them).
Claims are counted twice: in the database (``claims``) and in the dispatchers' logs."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from procs import Proc, pg_database, service_env, wait_for

from service.db import upgrade
from service.jobspec import JobSpec
from service.store import Store

pytestmark = pytest.mark.slow

JOBS = 20
# One candidate (no Ray), no plots: a few seconds each.
SPEC = {"data": {"calib_size": 8, "val_size": 32, "test_limit": 90},
        "artifacts": {"plots": False}}
CLAIM = re.compile(r"job ([0-9a-f]{32}): claimed by (\S+) \(claim (\d+)\)")


def test_two_dispatchers_twenty_jobs(tmp_path):
    with pg_database() as url:
        upgrade(url)
        store = Store.from_url(url)
        env = service_env(tmp_path, url)
        ids = [store.create_job(JobSpec.model_validate(SPEC | {"quant": {"seed": i}})
                                .model_dump(mode="json")).id for i in range(JOBS)]
        workers = [Proc.worker(env, tmp_path / f"worker{k}.log") for k in range(2)]
        try:
            def all_finished():
                jobs, total = store.list_jobs(limit=JOBS)
                return total == JOBS and all(j.finished for j in jobs) and jobs

            jobs = wait_for(all_finished, 600, f"{JOBS} jobs to finish", interval=0.5)
        finally:
            for w in workers:
                w.stop()
        try:
            assert all(w.popen.returncode == 0 for w in workers)  # stopped cleanly by SIGTERM
            assert sorted(j.id for j in jobs) == sorted(ids)
            bad = [(j.id, j.status, j.error) for j in jobs if j.status != "succeeded"]
            assert not bad, bad
            assert [j.claims for j in jobs] == [1] * JOBS  # none ran twice
            for j in jobs:
                assert len(store.candidates(j.id)) == 1
                names = [a.name for a in store.artifacts(j.id)]
                # checkpoint, report and ONNX model, once each
                assert len(names) == len(set(names)) == 3

            claims = [CLAIM.findall(w.output()) for w in workers]
            counted = Counter(job_id for lines in claims for job_id, _, _ in lines)
            assert counted == Counter({job_id: 1 for job_id in ids})
            assert {n for lines in claims for _, _, n in lines} == {"1"}
            per_worker = [len(lines) for lines in claims]
            assert all(per_worker), per_worker  # both took part
            by_db = Counter(j.claimed_by for j in jobs)
            assert sorted(by_db.values()) == sorted(per_worker)
            span = max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)
            print(f"\n{JOBS} jobs on 2 dispatchers: all succeeded, each claimed once "
                  f"(per dispatcher {per_worker}), in {span.total_seconds():.1f} s")
        finally:
            store.engine.dispose()
