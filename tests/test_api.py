"""The REST API on SQLite and PostgreSQL, with no dispatcher: state changes a dispatcher would
make (claim, progress, candidates, artifacts, finish) are driven through the store directly."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from db_fixtures import db_url_fixture  # noqa: F401
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from api.app import create_app
from api.routes.models import BadFile, RefusedFormat, check_safetensors
from service.db import upgrade
from service.models import UploadedModel
from service.settings import Settings
from service.store import Store, StoreError

CHUNK = 64  # small store chunks: downloads span several
MAX_UPLOAD = 8192
UNKNOWN = "0" * 32
TOKEN = "s3cret-token"


def _settings(tmp_path: Path, db_url: str, **kwargs) -> Settings:
    (tmp_path / "data").mkdir(exist_ok=True)
    return Settings(database_url=db_url, data_dir=tmp_path, data_roots=[tmp_path / "data"],
                    max_upload_bytes=MAX_UPLOAD, chunk_bytes=CHUNK, **kwargs)


@pytest.fixture
def store(db_url):
    upgrade(db_url)
    store = Store.from_url(db_url, chunk_bytes=CHUNK)
    yield store
    store.engine.dispose()


@pytest.fixture
def client(store, db_url, tmp_path):
    return TestClient(create_app(_settings(tmp_path, db_url), store))


def _jobs(store: Store) -> int:
    return store.list_jobs(limit=0)[1]


def _models(store: Store) -> int:
    with store.sessions() as s:
        return s.scalar(select(func.count()).select_from(UploadedModel))


def _safetensors() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save_safetensors({"w": torch.randn(4, 8, generator=g), "b": torch.zeros(8)},
                            metadata={"format": "pt"})


def _handmade_safetensors(header_len: int) -> bytes:
    """A valid file whose JSON header is padded to exactly ``header_len`` bytes."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (header_len - len(header))
    return header_len.to_bytes(8, "little") + header + bytes(8)


def _detail(r) -> str:
    body = r.json()
    assert set(body) == {"detail"}, body
    return json.dumps(body["detail"]) if not isinstance(body["detail"], str) else body["detail"]


# -- jobs ---------------------------------------------------------------------------------------


def test_submit_fills_defaults(client, store):
    r = client.post("/jobs", json={})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["cancel_requested"] is False
    assert job["progress"] == {"done": 0, "total": 0, "stage": None}
    assert job["result"] is None and job["claims"] == 0 and job["started_at"] is None
    req = job["request"]
    assert req["model"] == "digits_vit" and req["weights"] == "pretrained"
    assert req["data"]["source"] == "digits" and req["data"]["calib_size"] == 32
    assert req["quant"] == {"method": "tsptq", "setting": "full", "w_bits": 8, "a_bits": 8,
                            "seed": 0, "weight_rounding": None}
    assert req["search"]["strategy"] == "none"
    assert store.get_job(job["id"]).request == req  # stored exactly as answered

    r2 = client.post("/jobs", json={"model": "digits_vit", "quant": {"w_bits": 4}})
    assert r2.status_code == 202
    assert r2.json()["request"]["quant"]["w_bits"] == 4
    assert client.get(r2.headers["location"]).json()["id"] == r2.json()["id"]


def test_list_filter_paginate_get(client, store):
    ids = [client.post("/jobs", json={"quant": {"seed": i}}).json()["id"] for i in range(5)]
    store.claim_next("w1")
    store.claim_next("w1")
    store.set_progress(ids[1], 3, 10, "search")
    result, timings = {"top1": 0.98, "fp32_top1": 0.986, "size_bytes": 12345}, {"total_s": 1.5}
    assert store.finish(ids[0], result, timings)

    page = client.get("/jobs").json()
    assert page["total"] == 5 and (page["limit"], page["offset"]) == (50, 0)
    assert [j["id"] for j in page["items"]] == ids[::-1]  # newest first

    queued = client.get("/jobs", params={"status": "queued"}).json()
    assert queued["total"] == 3 and {j["id"] for j in queued["items"]} == set(ids[2:])
    running = client.get("/jobs", params={"status": "running"}).json()["items"]
    assert [j["id"] for j in running] == [ids[1]]
    assert running[0]["progress"] == {"done": 3, "total": 10, "stage": "search"}
    assert running[0]["claims"] == 1 and running[0]["started_at"] is not None
    assert client.get("/jobs", params={"status": "failed"}).json() == {
        "items": [], "total": 0, "limit": 50, "offset": 0}

    page = client.get("/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["id"] for j in page["items"]] == [ids[3], ids[2]] and page["total"] == 5
    assert client.get("/jobs", params={"offset": 5}).json()["items"] == []

    for params in ({"status": "bogus"}, {"limit": 0}, {"limit": 201}, {"offset": -1},
                   {"limit": "x"}):
        r = client.get("/jobs", params=params)
        assert r.status_code == 422, params
        assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["msg"]

    done = client.get(f"/jobs/{ids[0]}").json()
    assert done["status"] == "succeeded" and done["result"] == result
    assert done["timings"] == timings and done["finished_at"] is not None

    for bad in (UNKNOWN, "nope", "x" * 300):
        r = client.get(f"/jobs/{bad}")
        assert r.status_code == 404 and "no job" in _detail(r)


def test_candidates(client, store):
    job_id = client.post("/jobs", json={}).json()["id"]
    assert client.get(f"/jobs/{job_id}/candidates").json() == []
    store.claim_next("w")
    for seq, key in [(1, "b"), (0, "a"), (2, "c")]:
        store.add_candidate(job_id, key, seq, {"bits": {"x": 8 - seq}}, kl=0.1 * seq,
                            agreement=1 - 0.01 * seq, costs={"mean_w_bits": 8 - seq})
    cands = client.get(f"/jobs/{job_id}/candidates").json()
    assert [c["seq"] for c in cands] == [0, 1, 2] and [c["key"] for c in cands] == list("abc")
    assert cands[1]["spec"] == {"bits": {"x": 7}} and cands[1]["costs"] == {"mean_w_bits": 7}
    assert cands[2]["kl"] == pytest.approx(0.2) and cands[2]["agreement"] == pytest.approx(0.98)
    assert set(cands[0]) == {"seq", "key", "spec", "kl", "agreement", "costs", "created_at"}
    r = client.get(f"/jobs/{UNKNOWN}/candidates")
    assert r.status_code == 404 and "no job" in _detail(r)


def test_a_finished_jobs_candidates_are_served_from_memory_and_stay_current(client, store):
    """Cached once the job is final, under its candidate count: a candidate that arrives late
    (a dispatcher that lost the job still reporting) shows all the same."""
    from api.routes import jobs as jobs_route

    job_id = client.post("/jobs", json={}).json()["id"]
    store.claim_next("w")
    store.add_candidate(job_id, "a", 0, {"bits": {}}, 0.1, 0.9, {"weight_bits": 8})
    assert store.finish(job_id, {"top1": 1.0}, {})
    before = len(jobs_route._candidate_bodies)
    first = client.get(f"/jobs/{job_id}/candidates")
    assert first.headers["content-type"] == "application/json"
    assert len(jobs_route._candidate_bodies) == before + 1
    assert client.get(f"/jobs/{job_id}/candidates").content == first.content
    assert len(jobs_route._candidate_bodies) == before + 1  # the same body, not made again
    store.add_candidate(job_id, "b", 1, {"bits": {}}, 0.2, 0.8, {"weight_bits": 6})
    assert [c["key"] for c in client.get(f"/jobs/{job_id}/candidates").json()] == ["a", "b"]


def test_body_cache_is_bounded_in_bytes():
    from api.cache import BodyCache

    cache = BodyCache(max_bytes=10)
    assert cache.get("a", lambda: b"12345") == b"12345"
    assert cache.get("a", lambda: b"other") == b"12345"  # made once
    cache.get("b", lambda: b"123")
    cache.get("a", lambda: b"")  # a is now the most recently used
    cache.get("c", lambda: b"1234")  # 12 bytes: b, the least recently used, goes
    assert cache.get("b", lambda: b"new") == b"new" and len(cache) <= 3
    assert cache.get("huge", lambda: b"x" * 11) == b"x" * 11  # larger than the cache: not kept
    assert cache.get("huge", lambda: b"y") == b"y"


def test_cancel(client, store):
    running, done, ended, queued = (client.post("/jobs", json={}).json()["id"] for _ in range(4))
    assert [store.claim_next("w").id for _ in range(3)] == [running, done, ended]
    assert store.finish(done, {"top1": 1.0}, {})
    assert store.mark_cancelled(ended)  # a dispatcher stopped it

    r = client.delete(f"/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    assert store.get_job(queued).status == "cancelled"
    r = client.delete(f"/jobs/{queued}")
    assert r.status_code == 409 and f"job {queued} is already cancelled" in _detail(r)

    r = client.delete(f"/jobs/{running}")
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    assert store.get_job(running).cancel_requested
    assert client.delete(f"/jobs/{running}").status_code == 202  # asking again is harmless

    r = client.delete(f"/jobs/{done}")
    assert r.status_code == 409 and "is already succeeded" in _detail(r)
    assert store.get_job(done).status == "succeeded"
    r = client.delete(f"/jobs/{ended}")
    assert r.status_code == 409 and "is already cancelled" in _detail(r)
    r = client.delete(f"/jobs/{UNKNOWN}")
    assert r.status_code == 404 and "no job" in _detail(r)


def test_artifacts_list_and_download(client, store, monkeypatch):
    job_id = client.post("/jobs", json={}).json()["id"]
    r = client.get(f"/jobs/{job_id}/artifacts")
    assert r.status_code == 409 and "artifacts are written when the job succeeds" in _detail(r)
    store.claim_next("w")
    r = client.get(f"/jobs/{job_id}/artifacts")
    assert r.status_code == 409 and "running" in _detail(r)

    payload = bytes(range(256)) * 5 + b"tail"  # 1284 bytes: 21 chunks of 64
    report = json.dumps({"top1": 0.98}).encode()
    ckpt = store.add_artifact(job_id, "checkpoint", "digits_vit_tsptq_w8a8.safetensors",
                              "application/octet-stream", payload)
    store.add_artifact(job_id, "report", "report.json", "application/json", report)
    plot = store.add_artifact(job_id, "plot", "pareto front é.png", "image/png", b"\x89PNG..")
    assert store.finish(job_id, {"top1": 0.98}, {"total_s": 3.0})

    arts = client.get(f"/jobs/{job_id}/artifacts").json()
    by_name = {a["name"]: a for a in arts}
    assert set(by_name) == {"digits_vit_tsptq_w8a8.safetensors", "report.json",
                            "pareto front é.png"}
    a = by_name["digits_vit_tsptq_w8a8.safetensors"]
    assert a == {**a, "id": ckpt.id, "kind": "checkpoint", "size": len(payload),
                 "sha256": hashlib.sha256(payload).hexdigest(),
                 "media_type": "application/octet-stream", "url": f"/artifacts/{ckpt.id}"}

    pulled = []
    real_iter = store.iter_artifact

    def counting_iter(artifact_id):
        for chunk in real_iter(artifact_id):
            pulled.append(len(chunk))
            yield chunk

    monkeypatch.setattr(store, "iter_artifact", counting_iter)
    with client.stream("GET", a["url"]) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert body == payload
    assert len(pulled) == 21 and max(pulled) == CHUNK  # streamed chunk by chunk
    assert r.headers["content-length"] == str(len(payload))
    assert r.headers["x-content-sha256"] == hashlib.sha256(payload).hexdigest()
    assert r.headers["etag"] == f'"{a["sha256"]}"'
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == \
        'attachment; filename="digits_vit_tsptq_w8a8.safetensors"; ' \
        "filename*=UTF-8''digits_vit_tsptq_w8a8.safetensors"
    r = client.get(a["url"], headers={"If-None-Match": r.headers["etag"]})
    assert r.status_code == 304 and r.content == b""

    r = client.get(f"/artifacts/{plot.id}")
    assert r.content == b"\x89PNG.." and r.headers["content-type"] == "image/png"
    assert "filename*=UTF-8''pareto%20front%20%C3%A9.png" in r.headers["content-disposition"]
    assert client.get(by_name["report.json"]["url"]).json() == {"top1": 0.98}

    for bad in (UNKNOWN, "nope"):
        r = client.get(f"/artifacts/{bad}")
        assert r.status_code == 404 and "no artifact" in _detail(r)
    r = client.get(f"/jobs/{UNKNOWN}/artifacts")
    assert r.status_code == 404 and "no job" in _detail(r)

    # A failed job has no artifacts, but may be asked for them.
    other = client.post("/jobs", json={}).json()["id"]
    store.claim_next("w")
    store.fail(other, "boom")
    assert client.get(f"/jobs/{other}/artifacts").json() == []


def test_bad_job_requests_store_nothing(client, store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data" / "escape").symlink_to(outside, target_is_directory=True)
    (tmp_path / "data" / "imgs").mkdir()
    r = client.post("/jobs", json={"data": {"source": "imgs"}})  # a good one, for contrast
    assert r.status_code == 202, r.text
    before = _jobs(store)

    bodies = {
        "unknown model": ({"model": "no_such_model"}, "unknown timm model"),
        "unsupported architecture": ({"model": "resnet50"}, "unsupported architecture ResNet"),
        "w_bits 9": ({"quant": {"w_bits": 9}}, "w_bits"),
        "a_bits 2": ({"quant": {"a_bits": 2}}, "a_bits"),
        "negative calib_size": ({"data": {"calib_size": -1}}, "calib_size"),
        "unknown field": ({"modle": "digits_vit"}, "extra_forbidden"),
        "wrong type": ({"quant": {"w_bits": "eight"}}, "w_bits"),
        "not an object": ([1, 2], "model_attributes_type"),
        "greedy without budget": ({"search": {"strategy": "greedy"}}, "needs a budget"),
        "unknown upload": ({"weights": f"model:{UNKNOWN}"}, "no uploaded model"),
        "weights foo": ({"weights": "foo"}, "weights must be"),
        "dotdot": ({"data": {"source": "../etc"}}, "without '..'"),
        "absolute": ({"data": {"source": "/etc"}}, "relative to a data root"),
        "symlink out": ({"data": {"source": "escape"}}, "leaves its data root"),
        "missing dir": ({"data": {"source": "missing"}}, "not a directory"),
        "nul byte": ({"data": {"source": "a\x00b"}}, "data.source"),
        "lone surrogate": ({"data": {"source": "\ud800"}}, "data.source"),
    }
    for what, (body, message) in bodies.items():
        r = client.post("/jobs", content=json.dumps(body),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, (what, r.text)
        assert message in _detail(r), (what, r.text)

    raw = {
        "malformed JSON": (b'{"model": ', 422),
        "NaN": (b'{"search": {"budget_weight_bits": NaN}}', 422),
        "not UTF-8": (b'{"model": "\xff\xfe"}', 400),
        "empty": (b"", 422),
    }
    for what, (content, code) in raw.items():
        r = client.post("/jobs", content=content, headers={"content-type": "application/json"})
        assert r.status_code == code, (what, r.text)
        assert _detail(r), what
    # Not JSON at all, and bytes that are not UTF-8: still a JSON 422, not a 500.
    r = client.post("/jobs", content=b"\xff\x00garbage", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and _detail(r)
    assert _jobs(store) == before


# -- uploaded models ----------------------------------------------------------------------------


def test_upload_model_and_use_it(client, store):
    data = _safetensors()
    r = client.post("/models", params={"name": "my.safetensors"}, content=data,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    model = r.json()
    assert r.headers["location"] == f"/models/{model['id']}"
    assert model == {**model, "name": "my.safetensors", "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(),
                     "weights": f"model:{model['id']}"}
    assert client.get(r.headers["location"]).json() == model
    assert b"".join(store.iter_model(model["id"])) == data

    r = client.post("/jobs", json={"weights": model["weights"]})
    assert r.status_code == 202 and r.json()["request"]["weights"] == model["weights"]

    # The default name; a header of 128 bytes makes a valid file start with 0x80 (as a pickle).
    r = client.post("/models", content=_handmade_safetensors(128))
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "model.safetensors"

    for bad in (UNKNOWN, "nope"):
        r = client.get(f"/models/{bad}")
        assert r.status_code == 404 and "no uploaded model" in _detail(r)


def test_list_uploaded_models(client, store):
    """What the dashboard's submit form offers as weights: newest first, ``limit`` at most."""
    assert client.get("/models").json() == []
    ids = []
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        r = client.post("/models", params={"name": name}, content=_safetensors(),
                        headers={"content-type": "application/octet-stream"})
        ids.append(r.json()["id"])
    listed = client.get("/models").json()
    assert [m["id"] for m in listed] == ids[::-1]
    assert listed[0]["weights"] == f"model:{ids[2]}" and listed[0]["name"] == "c.safetensors"
    assert [m["id"] for m in client.get("/models", params={"limit": 2}).json()] == ids[:0:-1]
    for bad in (0, 501, "x"):
        assert client.get("/models", params={"limit": bad}).status_code == 422


def test_upload_refused(client, store):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    good = _safetensors()
    header_len = int.from_bytes(good[:8], "little")
    cases = {
        "torch.save (zip)": (buf.getvalue(), 415, "pickle/zip checkpoints are refused"),
        "pickle": (pickle.dumps({"w": [1.0, 2.0]}), 415, "pickle/zip checkpoints are refused"),
        "truncated": (good[:-5], 422, "truncated"),
        "truncated header": (good[: 8 + header_len // 2], 422, "truncated"),
        "garbage": (b"this is not a model at all, just text" * 3, 422, "header length"),
        "tiny": (b"abc", 422, "shorter than"),
        "empty": (b"", 422, "shorter than"),
        "extra data": (good + b"xx", 422, "bad safetensors file"),
        "header not JSON": ((8).to_bytes(8, "little") + b"{{{{{{{{", 422, "not JSON"),
        "header a list": ((8).to_bytes(8, "little") + b"[]      ", 422, "not a JSON object"),
    }
    for what, (content, code, message) in cases.items():
        r = client.post("/models", content=content,
                        headers={"content-type": "application/octet-stream"})
        assert r.status_code == code, (what, r.text)
        assert message in _detail(r), (what, r.text)
    for name in ("", "x" * 256, "a\x00b", "line\nbreak"):
        assert client.post("/models", params={"name": name}, content=good).status_code == 422
    assert _models(store) == 0


def test_upload_too_large(client, store):
    big = bytes(MAX_UPLOAD + 1)
    r = client.post("/models", content=big)  # Content-Length says it all
    assert r.status_code == 413 and "exceeds the limit" in _detail(r)

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(MAX_UPLOAD // 1000 + 2):
            yield bytes(1000)

    r = client.post("/models", content=chunks())
    assert r.status_code == 413 and "exceeds the limit" in _detail(r)
    assert _models(store) == 0


def _header(entries: dict) -> bytes:
    h = json.dumps(entries).encode()
    return len(h).to_bytes(8, "little") + h


@pytest.mark.parametrize("entries, data, message", [
    ({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
    ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "shape"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "does not fill"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [1]}}, 4, "exactly dtype"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "y": 1}}, 4, "exactly"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, 8, "overlap or gap"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "overlap or gap"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 2, "truncated"),
    ({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, "does not fill"),
    ({"__metadata__": {"a": 1}}, 0, "__metadata__"),
    ({"__metadata__": {"a": "b"}}, 0, "no tensors"),
    ({"x": "F32"}, 4, "exactly dtype"),
])
def test_check_safetensors_rejects(entries, data, message):
    content = _header(entries) + bytes(data)
    with pytest.raises(BadFile, match=message) as e:
        check_safetensors(io.BytesIO(content), len(content))
    assert not isinstance(e.value, RefusedFormat)


def test_check_safetensors_accepts():
    for content in (_safetensors(), _handmade_safetensors(128), _header({
            "a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
            "e": {"dtype": "BF16", "shape": [0], "data_offsets": [2, 2]},
            "b": {"dtype": "I64", "shape": [1, 1], "data_offsets": [2, 10]},
            "__metadata__": {"k": "v"}}) + bytes(10)):
        assert check_safetensors(io.BytesIO(content), len(content)) >= 1


# -- auth, health, failures, OpenAPI ------------------------------------------------------------


def test_auth(store, db_url, tmp_path):
    client = TestClient(create_app(_settings(tmp_path, db_url, api_token=TOKEN), store))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/jobs", json={}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer" and "bearer token" in _detail(r)
        for path in ("/jobs", f"/jobs/{UNKNOWN}", "/docs", "/openapi.json",
                     f"/artifacts/{UNKNOWN}"):
            assert client.get(path, headers=headers).status_code == 401, (path, headers)
        assert client.post("/models", content=_safetensors(), headers=headers).status_code == 401
    assert _jobs(store) == 0 and _models(store) == 0

    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/jobs", json={}, headers=auth)
    assert r.status_code == 202
    assert client.get(r.headers["location"], headers=auth).status_code == 200
    assert client.get("/jobs", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.get("/docs", headers=auth).status_code == 200
    schema = client.get("/openapi.json", headers=auth).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in schema["paths"]["/jobs"]["post"]["responses"]
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_health(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok"}


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:1/nothing",
                                 "sqlite:///{tmp}"])
def test_database_unreachable(url, tmp_path):
    # SQLite: the "file" is a directory, which it cannot open. The app makes its own store.
    app = create_app(Settings(database_url=url.format(tmp=tmp_path), data_dir=tmp_path))
    with TestClient(app) as client:  # the lifespan disposes the engine
        for method, path, body in [("GET", "/healthz", None), ("GET", "/jobs", None),
                                   ("POST", "/jobs", {}), ("GET", f"/jobs/{UNKNOWN}", None),
                                   ("POST", "/models", None), ("GET", "/models", None)]:
            content = _safetensors() if path == "/models" else None
            r = client.request(method, path, json=body, content=content)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"] == "5"
            assert _detail(r).startswith("database unavailable") and "retry later" in _detail(r)


def test_openapi(client):
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "tsptq" and schema["info"]["version"]
    ops = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert ops == {("/healthz", "get"), ("/jobs", "post"), ("/jobs", "get"),
                   ("/jobs/{job_id}", "get"), ("/jobs/{job_id}", "delete"),
                   ("/jobs/{job_id}/candidates", "get"), ("/jobs/{job_id}/artifacts", "get"),
                   ("/artifacts/{artifact_id}", "get"), ("/models", "post"),
                   ("/models", "get"), ("/models/{model_id}", "get")}
    # The dashboard's shell (/, /ui...) is not part of the API.
    for (path, method) in ops:
        codes = schema["paths"][path][method]["responses"]
        assert "503" in codes, (path, method)
        if path != "/healthz":
            assert "422" in codes and "401" not in codes, (path, method)
    assert set(schema["paths"]["/jobs/{job_id}"]["delete"]["responses"]) >= {
        "200", "202", "404", "409"}
    assert schema["paths"]["/jobs"]["post"]["responses"]["202"]
    assert "application/octet-stream" in \
        schema["paths"]["/models"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    # 405 names every method of the path, though each method is its own route.
    for path, allow in (("/jobs", "GET, POST"), (f"/jobs/{UNKNOWN}", "GET, DELETE"),
                        ("/healthz", "GET")):
        r = client.request("OPTIONS", path)
        assert r.status_code == 405 and r.headers["allow"] == allow, path
        assert _detail(r) == "Method Not Allowed"


def test_unexpected_errors_are_json(client, store, monkeypatch):
    client = TestClient(client.app, raise_server_exceptions=False)

    def corrupt(job_id):
        raise StoreError(f"job {job_id} is corrupt")

    monkeypatch.setattr(store, "get_job", corrupt)
    r = client.get(f"/jobs/{UNKNOWN}")
    assert r.status_code == 500 and _detail(r) == f"internal store error: job {UNKNOWN} is corrupt"

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "list_jobs", boom)
    r = client.get("/jobs")
    assert r.status_code == 500 and _detail(r) == "internal server error"
