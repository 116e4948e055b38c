"""The store on SQLite and PostgreSQL: job lifecycle, claims under concurrency, candidates,
chunked artifacts and uploads, and connection failures."""

from __future__ import annotations

import hashlib
import io
import threading
from datetime import timedelta

import pytest
from db_fixtures import db_url_fixture  # noqa: F401
from sqlalchemy import delete, event, func, select, update

from service.db import make_engine, make_sessionmaker, upgrade
from service.models import (
    Artifact,
    ArtifactChunk,
    Candidate,
    Job,
    ModelChunk,
    UploadedModel,
    utcnow,
)
from service.store import DatabaseUnavailable, NotFound, Store, TooLarge

CHUNK = 1024
UNKNOWN = "0" * 32


@pytest.fixture
def store(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield Store(make_sessionmaker(engine), chunk_bytes=CHUNK)
    engine.dispose()


def _execute(store: Store, stmt) -> None:
    with store.sessions.begin() as s:
        s.execute(stmt)


def _count(store: Store, table, *where) -> int:
    with store.sessions() as s:
        return s.scalar(select(func.count()).select_from(table).where(*where))


def test_create_get_list(store):
    request = {"model": "digits_vit", "widths": [[8, 8], [4, 4]], "nested": {"a": None}}
    ids = [store.create_job({**request, "i": i}).id for i in range(5)]
    job = store.get_job(ids[0])
    assert job.status == "queued" and job.request == {**request, "i": 0}
    assert len(job.id) == 32 and job.claims == 0 and job.cancel_requested is False
    assert job.progress_done == job.progress_total == 0
    assert job.created_at.utcoffset() == timedelta(0)
    assert job.result is None and job.started_at is None
    assert store.get_job(UNKNOWN) is None

    assert [store.claim_next("w").id for _ in range(2)] == ids[:2]
    jobs, total = store.list_jobs()
    assert total == 5 and [j.id for j in jobs] == ids[::-1]
    jobs, total = store.list_jobs(status="queued")
    assert total == 3 and [j.id for j in jobs] == ids[:1:-1]
    jobs, total = store.list_jobs(status="running", limit=1, offset=1)
    assert total == 2 and [j.id for j in jobs] == [ids[0]]
    jobs, total = store.list_jobs(limit=2, offset=4)
    assert total == 5 and [j.id for j in jobs] == [ids[0]]
    assert store.list_jobs(status="failed") == ([], 0)
    with pytest.raises(ValueError, match="unknown status"):
        store.list_jobs(status="done")


def test_cancel(store):
    running, finished, queued = (store.create_job({"i": i}).id for i in range(3))
    assert store.claim_next("w").id == running
    assert store.claim_next("w").id == finished
    assert store.finish(finished, {"ok": True}, {"total_s": 1.0})

    job = store.request_cancel(queued)
    assert job.status == "cancelled" and job.finished_at is not None
    assert store.claim_next("w") is None  # a cancelled job is never claimed

    job = store.request_cancel(running)
    assert job.status == "running" and job.cancel_requested and job.finished_at is None
    assert store.heartbeat(running, "w")  # the worker still owns it until it stops
    assert store.mark_cancelled(running)
    job = store.get_job(running)
    assert job.status == "cancelled" and job.finished_at is not None

    before = store.get_job(finished)
    after = store.request_cancel(finished)
    assert after.status == "succeeded" and not after.cancel_requested
    assert after.finished_at == before.finished_at and after.result == {"ok": True}
    assert store.request_cancel(UNKNOWN) is None


def test_claim_order_and_reclaim(store):
    ids = [store.create_job({"i": i}).id for i in range(3)]
    job = store.claim_next("w1")
    assert job.id == ids[0] and job.status == "running" and job.claimed_by == "w1"
    assert job.claims == 1 and job.started_at == job.heartbeat_at is not None
    assert [store.claim_next("w2").id for _ in range(2)] == ids[1:]
    assert store.claim_next("w1") is None

    _execute(store, update(Job).where(Job.id == ids[0])
             .values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    assert store.requeue_stale(60) == [ids[0]]
    again = store.claim_next("w3")
    assert again.id == ids[0] and again.claims == 2 and again.claimed_by == "w3"
    assert again.started_at == job.started_at  # the first start is kept


def test_concurrent_claims(db_url):
    """Four dispatchers (each with its own engine, as separate processes would have) claim
    twenty jobs at once: each job goes to exactly one of them, once."""
    upgrade(db_url)
    stores = [Store(make_sessionmaker(make_engine(db_url))) for _ in range(4)]
    ids = {stores[0].create_job({"i": i}).id for i in range(20)}
    claimed: list[list[str]] = [[] for _ in stores]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def dispatcher(k: int) -> None:
        try:
            start.wait()
            while (job := stores[k].claim_next(f"w{k}")) is not None:
                claimed[k].append(job.id)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=dispatcher, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        flat = [i for ids_k in claimed for i in ids_k]
        assert sorted(flat) == sorted(ids)
        jobs, total = stores[0].list_jobs(limit=100)
        assert total == 20
        assert all(j.status == "running" and j.claims == 1 for j in jobs)
        assert all(j.claimed_by == f"w{k}" for k, ids_k in enumerate(claimed)
                   for j in jobs if j.id in ids_k)
    finally:
        for s in stores:
            s.engine.dispose()


def test_heartbeat_and_requeue_stale(store):
    a, b, c = (store.create_job({"i": i}).id for i in range(3))
    for _ in range(3):
        store.claim_next("w1")
    assert store.heartbeat(a, "w1")
    assert not store.heartbeat(a, "w2")
    assert not store.heartbeat(UNKNOWN, "w1")
    assert store.requeue_stale(30) == []

    old = utcnow() - timedelta(seconds=60)
    _execute(store, update(Job).where(Job.id.in_([a, b])).values(heartbeat_at=old))
    store.request_cancel(b)  # stale and cancel requested: cancelled, not requeued
    assert store.requeue_stale(30) == [a]
    job = store.get_job(a)
    assert job.status == "queued" and job.claimed_by is None and job.heartbeat_at is None
    assert not store.heartbeat(a, "w1")  # the dead worker has lost it
    assert store.get_job(b).status == "cancelled"
    assert store.get_job(c).status == "running"
    assert store.requeue_stale(30) == []


def test_a_job_that_crashed_its_dispatchers_max_attempts_times_is_failed(store):
    old = utcnow() - timedelta(seconds=60)
    crashing, other = (store.create_job({"i": i}).id for i in range(2))
    for attempt in (1, 2):  # two dispatchers claim it and die: requeued each time
        assert store.claim_next(f"w{attempt}").id == crashing
        store.set_progress(crashing, attempt, 10, "search")
        _execute(store, update(Job).where(Job.id == crashing).values(heartbeat_at=old))
        assert store.abandon_stale(30, max_attempts=3) == []
        assert store.requeue_stale(30) == [crashing]
    assert store.claim_next("w3").id == crashing
    assert store.claim_next("w4").id == other
    store.set_progress(crashing, 7, 10, "search")
    assert store.abandon_stale(30, max_attempts=3) == []  # w3 still beats
    _execute(store, update(Job).where(Job.id.in_([crashing, other])).values(heartbeat_at=old))
    assert store.abandon_stale(30, max_attempts=3) == [crashing]
    failed = store.get_job(crashing)
    assert failed.status == "failed" and failed.claims == 3 and failed.finished_at is not None
    assert "abandoned after 3 attempts" in failed.error
    assert "w3" in failed.error and "'search' (7/10)" in failed.error
    assert store.requeue_stale(30) == [other]  # one claim only: requeued as before
    assert store.get_job(crashing).status == "failed"


def test_release_hands_the_job_back_without_counting_an_attempt(store):
    job_id = store.create_job({}).id
    store.claim_next("w1")
    store.add_candidate(job_id, "k1", 0, {}, 0.1, 0.9, {})
    assert not store.release(job_id, "w2")  # not its job
    assert store.release(job_id, "w1")
    job = store.get_job(job_id)
    assert job.status == "queued" and job.claimed_by is None and job.claims == 0
    assert not store.heartbeat(job_id, "w1")
    assert store.candidate_scores(job_id) == {"k1": (0.1, 0.9)}  # kept for the next run
    assert store.claim_next("w2").claims == 1
    assert not store.release(job_id, "w1")


def test_finish_with_artifacts_is_all_or_nothing(store):
    job_id = store.create_job({}).id
    store.claim_next("w1")
    files = [("checkpoint", "m.safetensors", "application/octet-stream", b"w" * 3000),
             ("report", "report.json", "application/json", b"{}")]
    assert not store.finish_with_artifacts(job_id, files, {"top1": 1.0}, {}, "w2")
    assert store.artifacts(job_id) == [] and store.get_job(job_id).status == "running"

    class Broken(io.RawIOBase):  # the second file fails half way (the disk, a pipe)
        def __init__(self):
            self.n = 0

        def readable(self):
            return True

        def readinto(self, buf):
            self.n += 1
            if self.n > 2:
                raise OSError(28, "No space left on device")
            buf[:CHUNK] = b"x" * CHUNK
            return CHUNK

    with pytest.raises(OSError, match="No space"):
        store.finish_with_artifacts(job_id, [files[0], ("onnx", "m.onnx", "application/onnx",
                                                         io.BufferedReader(Broken()))],
                                    {"top1": 1.0}, {}, "w1")
    assert store.artifacts(job_id) == []
    assert _count(store, ArtifactChunk) == 0
    assert store.get_job(job_id).status == "running"
    assert store.finish_with_artifacts(job_id, files, {"top1": 1.0}, {"s": 1}, "w1")
    done = store.get_job(job_id)
    assert done.status == "succeeded" and done.result == {"top1": 1.0}
    arts = {a.name: a for a in store.artifacts(job_id)}
    assert set(arts) == {"m.safetensors", "report.json"}
    assert b"".join(store.iter_artifact(arts["m.safetensors"].id)) == b"w" * 3000
    assert not store.finish_with_artifacts(job_id, files, {}, {}, "w1")  # finished already
    with pytest.raises(ValueError, match="unknown artifact kind"):
        store.finish_with_artifacts(job_id, [("weights", "x", "text/plain", b"")], {}, {})


def test_progress(store):
    job_id = store.create_job({}).id
    store.set_progress(job_id, 1, 10, "statistics")  # not running yet: ignored
    assert store.get_job(job_id).progress_total == 0
    store.claim_next("w")
    store.set_progress(job_id, 2, 10, "search")
    store.set_progress(job_id, 3, 10)
    job = store.get_job(job_id)
    assert (job.progress_done, job.progress_total, job.stage) == (3, 10, "search")


def test_candidates(store):
    job_id = store.create_job({}).id
    other = store.create_job({}).id
    spec = {"blocks.0.attn.qkv": [4, 8]}
    assert store.add_candidate(job_id, "k2", 2, spec, 0.5, 0.75, {"bits": 5.5})
    assert store.add_candidate(job_id, "k0", 0, {}, 0.0, 1.0, {"bits": 8.0})
    assert store.add_candidate(job_id, "k1", 1, spec, 0.25, 0.875, {"bits": 6.0})
    assert not store.add_candidate(job_id, "k1", 7, {}, 9.0, 0.0, {})  # ignored
    assert store.add_candidate(other, "k1", 0, {}, 1.0, 0.0, {})  # keys are per job
    cands = store.candidates(job_id)
    assert [(c.key, c.seq) for c in cands] == [("k0", 0), ("k1", 1), ("k2", 2)]
    assert cands[2].spec == spec and cands[2].costs == {"bits": 5.5}
    assert store.candidate_scores(job_id) == {"k0": (0.0, 1.0), "k1": (0.25, 0.875),
                                              "k2": (0.5, 0.75)}
    assert store.candidates(UNKNOWN) == []


class Trickle(io.RawIOBase):
    """A stream whose reads return at most 100 bytes, like a socket."""

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(min(n, 100) if n >= 0 else 100)


@pytest.mark.parametrize("kind", ["bytes", "stream", "path", "trickle"])
def test_artifact_roundtrip(store, tmp_path, kind):
    payload = bytes(range(256)) * 14  # 3584 bytes: 3.5 chunks
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(payload)
    source = {"bytes": payload, "stream": io.BytesIO(payload), "path": path,
              "trickle": Trickle(payload)}[kind]
    job_id = store.create_job({}).id
    art = store.add_artifact(job_id, "checkpoint", "w4a4.safetensors",
                             "application/octet-stream", source)
    assert art.size == len(payload) and art.sha256 == hashlib.sha256(payload).hexdigest()
    assert store.get_artifact(art.id).sha256 == art.sha256
    assert _count(store, ArtifactChunk, ArtifactChunk.artifact_id == art.id) == 4

    queries = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: queries.append(stmt) if "artifact_chunks" in stmt
                 else None)
    chunks = store.iter_artifact(art.id)
    assert next(chunks) == payload[:CHUNK] and len(queries) == 1  # lazily, one chunk a query
    rest = list(chunks)
    assert [len(c) for c in rest] == [CHUNK, CHUNK, 512] and len(queries) == 5
    assert b"".join([payload[:CHUNK], *rest]) == payload


def test_artifacts_listing_and_replacement(store):
    job_id = store.create_job({}).id
    first = store.add_artifact(job_id, "report", "report.json", "application/json", b"{}")
    store.add_artifact(job_id, "plot", "pareto.png", "image/png", b"\x89PNG" * 300)
    again = store.add_artifact(job_id, "report", "report.json", "application/json", b'{"a":1}')
    assert [a.name for a in store.artifacts(job_id)] == ["pareto.png", "report.json"]
    assert store.get_artifact(first.id) is None  # replaced, chunks gone with it
    assert _count(store, ArtifactChunk, ArtifactChunk.artifact_id == first.id) == 0
    assert b"".join(store.iter_artifact(again.id)) == b'{"a":1}'
    empty = store.add_artifact(job_id, "report", "empty.txt", "text/plain", b"")
    assert empty.size == 0 and list(store.iter_artifact(empty.id)) == []
    with pytest.raises(NotFound):
        store.iter_artifact(UNKNOWN)
    with pytest.raises(NotFound):
        store.add_artifact(UNKNOWN, "report", "x", "text/plain", b"x")
    with pytest.raises(ValueError, match="unknown artifact kind"):
        store.add_artifact(job_id, "weights", "x", "text/plain", b"x")


def test_deleting_a_job_cascades(store):
    job_id = store.create_job({}).id
    store.add_candidate(job_id, "k", 0, {}, 0.0, 1.0, {})
    art = store.add_artifact(job_id, "report", "r", "text/plain", b"x" * 3000)
    _execute(store, delete(Job).where(Job.id == job_id))
    assert store.candidates(job_id) == [] and store.artifacts(job_id) == []
    assert _count(store, ArtifactChunk, ArtifactChunk.artifact_id == art.id) == 0
    assert _count(store, Candidate) == _count(store, Artifact) == 0


def test_model_upload(store, tmp_path):
    payload = b"model-bytes!" * 300  # 3600 bytes
    model = store.add_model("vit.safetensors", io.BytesIO(payload), max_bytes=len(payload))
    assert model.size == len(payload) and model.sha256 == hashlib.sha256(payload).hexdigest()
    assert store.get_model(model.id).name == "vit.safetensors"
    assert b"".join(store.iter_model(model.id)) == payload
    (tmp_path / "out").mkdir()
    out = store.write_model_to(model.id, tmp_path / "out" / "m.safetensors")
    assert out.read_bytes() == payload and list(out.parent.iterdir()) == [out]  # no temp left

    with pytest.raises(TooLarge):
        store.add_model("big.safetensors", io.BytesIO(payload + b"!"), max_bytes=len(payload))
    assert _count(store, UploadedModel) == 1  # the rejected upload left nothing behind
    assert _count(store, ModelChunk) == 4
    with pytest.raises(NotFound):
        store.iter_model(UNKNOWN)
    with pytest.raises(NotFound):
        store.write_model_to(UNKNOWN, tmp_path / "x")


def test_finish_and_fail_do_not_overwrite(store):
    a, b = store.create_job({}).id, store.create_job({}).id
    assert not store.finish(a, {"x": 1}, {})  # queued, not running
    store.claim_next("w")
    store.claim_next("w")
    assert store.finish(a, {"x": 1}, {"total_s": 2.5})
    assert not store.fail(a, "late failure")
    assert not store.mark_cancelled(a)
    job = store.get_job(a)
    assert job.status == "succeeded" and job.result == {"x": 1} and job.error is None
    assert job.timings == {"total_s": 2.5} and job.finished_at is not None

    assert store.fail(b, "boom", {"total_s": 0.1})
    assert not store.finish(b, {"x": 2}, {})
    job = store.get_job(b)
    assert (job.status, job.error, job.result) == ("failed", "boom", None)


def test_ping(store):
    store.ping()


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:1/nothing",
                                 "sqlite:///{tmp}"])
def test_unreachable_database(url, tmp_path):
    # SQLite: the "file" is a directory, which it cannot open.
    store = Store.from_url(url.format(tmp=tmp_path))
    try:
        with pytest.raises(DatabaseUnavailable, match="database unavailable"):
            store.ping()
        with pytest.raises(DatabaseUnavailable):
            store.create_job({})
    finally:
        store.engine.dispose()
