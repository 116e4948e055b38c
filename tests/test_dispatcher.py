"""The dispatcher against a real database: a job runs to its artifacts; failures carry a message
a user can act on; cancel stops Ray work; a stale job is requeued and resumes without
recomputing its finished candidates."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import ray
from db_fixtures import db_url_fixture  # noqa: F401
from sqlalchemy import func, select

from quant import load_quantized
from quant.evaluate import compare, logits_of
from quant.zoo.data import digits_data
from quant.zoo.models import load_model
from service.db import upgrade
from service.dispatcher import Dispatcher
from service.models import ArtifactChunk
from service.settings import Settings
from service.store import Store

# Small and quick: 8 calibration images, 32 validation images, 90 test images.
SMALL = {"data": {"calib_size": 8, "val_size": 32, "test_limit": 90}}


def make(db_url: str, tmp_path, **kw) -> tuple[Store, Dispatcher]:
    upgrade(db_url)
    settings = Settings(database_url=db_url, data_dir=tmp_path, heartbeat_s=0.2,
                        stale_after_s=1.0, ray_workers=1, chunk_bytes=64 * 1024, **kw)
    store = Store.from_url(db_url, chunk_bytes=settings.chunk_bytes)
    return store, Dispatcher(store, settings, worker_id="test-dispatcher")


@pytest.fixture(scope="module")
def ray_local():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def test_job_runs_to_verified_artifacts(db_url, tmp_path):
    store, dispatcher = make(db_url, tmp_path)
    job = store.create_job(SMALL | {"model": "digits_vit"})
    assert dispatcher.run_once() == job.id
    done = store.get_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.progress_done == done.progress_total == 1 and done.stage == "artifacts"
    assert set(done.timings) >= {"search_s", "total_s"}
    assert [c.key for c in store.candidates(job.id)] == [done.result["search"]["key"]]
    arts = {a.name: a for a in store.artifacts(job.id)}
    assert {"report.json", "digits_vit_tsptq_w8a8.safetensors"} <= set(arts)
    assert any(n.startswith("plots/hist_") and n.endswith(".png") for n in arts)
    ckpt = arts["digits_vit_tsptq_w8a8.safetensors"]
    blob = b"".join(store.iter_artifact(ckpt.id))
    assert len(blob) == ckpt.size == done.result["size_bytes"]
    assert hashlib.sha256(blob).hexdigest() == ckpt.sha256
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(blob)
    data = digits_data(8, test_limit=90)  # the job's test sample (class-stratified, seeded)
    x, y = data.x_test, data.y_test
    res = compare(logits_of(load_model("digits_vit"), x), logits_of(load_quantized(path), x), y)
    assert res.top1 == pytest.approx(done.result["top1"])  # the reported accuracy is the file's
    assert dispatcher.run_once() is None  # nothing left


@pytest.mark.parametrize("request_, message", [
    ({"model": "resnet50"}, "unsupported architecture ResNet"),
    ({"model": "digits_vit", "weights": "model:" + "0" * 32}, "0" * 32),
    ({"model": "digits_vit", "data": {"source": "nowhere"}}, "not a directory under any"),
])
def test_failures_carry_an_actionable_message(tmp_path, request_, message):
    store, dispatcher = make(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    job = store.create_job(request_)
    dispatcher.run_once()
    failed = store.get_job(job.id)
    assert failed.status == "failed" and message in failed.error
    assert "Traceback" not in failed.error


def test_cancel_stops_a_running_search(tmp_path, ray_local):
    store, dispatcher = make(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    job = store.create_job(SMALL | {"search": {"strategy": "thresholds"}})

    def cancel_after_first_candidate():
        while not store.candidates(job.id):
            time.sleep(0.1)
        store.request_cancel(job.id)

    t = threading.Thread(target=cancel_after_first_candidate, daemon=True)
    t.start()
    start = time.monotonic()
    dispatcher.run_once()
    t.join(5)
    final = store.get_job(job.id)
    assert final.status == "cancelled"
    assert len(store.candidates(job.id)) < 1 + 72 + 16 * 9  # far from the whole search
    assert time.monotonic() - start < 120
    assert store.artifacts(job.id) == []


def test_stale_job_is_requeued_and_resumes_without_recomputing(tmp_path, ray_local):
    store, dispatcher = make(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    spec = SMALL | {"search": {"strategy": "thresholds", "max_candidates": 6}}
    first = store.create_job(spec)
    dispatcher.run_once()
    reference = store.get_job(first.id)
    assert reference.status == "succeeded", reference.error
    assert reference.result["search"]["evaluations"] == 6

    job = store.create_job(spec)
    store.claim_next("a-dispatcher-that-dies")
    for c in store.candidates(first.id)[:4]:  # it had scored four candidates when it died
        store.add_candidate(job.id, c.key, c.seq, c.spec, c.kl, c.agreement, c.costs)
    time.sleep(1.2)  # its heartbeat goes stale
    assert dispatcher.run_once() == job.id
    resumed = store.get_job(job.id)
    assert resumed.status == "succeeded" and resumed.claims == 2
    assert resumed.result["search"]["reused"] == 4
    assert resumed.result["search"]["evaluations"] == 2
    assert resumed.result["candidate"] == reference.result["candidate"]
    assert [c.key for c in store.candidates(job.id)] == [c.key for c in
                                                         store.candidates(first.id)]


def _refuse_onnx_rows_of(store: Store, job_id: str) -> None:
    """A trigger in the database that refuses the chunks of ``job_id``'s ONNX artifact (written
    after its checkpoint and report), as a server refuses a row too large for it."""
    if store.engine.dialect.name == "sqlite":
        ddl = [f"""CREATE TRIGGER refuse_rows BEFORE INSERT ON artifact_chunks
                   WHEN (SELECT job_id || kind FROM artifacts WHERE id = NEW.artifact_id)
                        = '{job_id}onnx'
                   BEGIN SELECT RAISE(ABORT, 'row refused: too large for this server'); END"""]
    else:
        ddl = [f"""CREATE FUNCTION refuse_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF (SELECT job_id || kind FROM artifacts WHERE id = NEW.artifact_id)
                      = '{job_id}onnx' THEN
                     RAISE EXCEPTION 'row refused: too large for this server';
                   END IF; RETURN NEW; END $$""",
               """CREATE TRIGGER refuse_rows BEFORE INSERT ON artifact_chunks FOR EACH ROW
                  EXECUTE FUNCTION refuse_rows()"""]
    with store.engine.begin() as conn:
        for statement in ddl:
            conn.exec_driver_sql(statement)


def test_a_failure_storing_artifacts_fails_the_job_and_keeps_none(db_url, tmp_path, ray_local):
    store, dispatcher = make(db_url, tmp_path)
    spec = SMALL | {"model": "digits_vit", "artifacts": {"plots": False}}
    refused, after = store.create_job(spec), store.create_job(spec)
    _refuse_onnx_rows_of(store, refused.id)
    assert dispatcher.run_once() == refused.id
    failed = store.get_job(refused.id)
    assert failed.status == "failed" and failed.result is None
    assert "artifacts could not be stored, so none is kept" in failed.error
    assert "row refused: too large for this server" in failed.error
    assert "Traceback" not in failed.error
    assert store.artifacts(refused.id) == []  # the checkpoint written before it went too
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ArtifactChunk)) == 0
    assert dispatcher.run_once() == after.id  # and the dispatcher goes on
    done = store.get_job(after.id)
    assert done.status == "succeeded", done.error
    assert {a.kind for a in store.artifacts(after.id)} == {"checkpoint", "report", "onnx"}
