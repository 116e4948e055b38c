"""Access control: with ``TSPTQ_API_TOKEN`` set, every route of the OpenAPI schema (and the docs,
the schema itself and unknown paths) answers 401 without the token or with a wrong one, and
nothing happens (every table compared before and after); ``/healthz`` stays open; the right
token opens every route. The token is compared in constant time (``hmac.compare_digest``).

The dashboard's shell (``/``, a redirect, and ``/ui...``: HTML, JavaScript, CSS) is open and
carries no job data: its pages fetch that from the API with the token.

``test_api.test_auth`` covers the basics on both databases; ``test_bad_input`` runs the whole
schema with the token through schemathesis, whose ``ignored_auth`` check re-sends accepted
requests without it and with a wrong one.
"""

from __future__ import annotations

import hmac
import re

import pytest
from db_fixtures import db_url_fixture  # noqa: F401
from fastapi.testclient import TestClient
from test_api import _safetensors
from test_bad_input import snapshot

import api.deps
from api.app import create_app
from api.deps import token_matches
from service.db import upgrade
from service.settings import Settings
from service.store import Store

TOKEN = "s3cret-tökén-ÿ"  # not ASCII: the header carries its UTF-8 bytes
RIGHT = b"Bearer " + TOKEN.encode()
WRONG = {
    "none": None,
    "wrong token": b"Bearer wrong",
    "empty bearer": b"Bearer ",
    "token without scheme": TOKEN.encode(),
    "basic scheme": b"Basic " + TOKEN.encode(),
    "token and more": RIGHT + b"x",
    "a prefix of the token": RIGHT[:-1],
    "token in another case": b"Bearer " + TOKEN.upper().encode(),
    "two schemes": b"Bearer Bearer " + TOKEN.encode(),
}


@pytest.fixture
def guarded(db_url, tmp_path):
    upgrade(db_url)
    store = Store.from_url(db_url, chunk_bytes=1024)
    app = create_app(Settings(database_url=db_url, data_dir=tmp_path, api_token=TOKEN), store)
    done = store.create_job({"model": "digits_vit"})
    assert store.claim_next("w").id == done.id
    job = store.create_job({"model": "digits_vit"})  # queued: a DELETE would cancel it
    artifact = store.add_artifact(done.id, "report", "report.json", "application/json", b"{}")
    store.finish(done.id, {"top1": 1.0}, {})
    model = store.add_model("m.safetensors", _safetensors(), 1 << 20)
    values = {"job_id": job.id, "artifact_id": artifact.id, "model_id": model.id}
    yield TestClient(app), store, app.openapi(), values
    store.engine.dispose()


def _requests(schema: dict, values: dict) -> list[tuple[str, str, dict]]:
    """One request per operation of the schema, on real ids, bodies that would be accepted."""
    out = []
    for path, item in schema["paths"].items():
        for method in item:
            url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
            kwargs: dict = {}
            if (method, path) == ("post", "/jobs"):
                kwargs = {"json": {}}
            elif (method, path) == ("post", "/models"):
                kwargs = {"content": _safetensors(),
                          "headers": {"content-type": "application/octet-stream"}}
            out.append((method.upper(), url, kwargs))
    return out


def _auth(value: bytes | None) -> dict:
    return {} if value is None else {"Authorization": value}


def test_every_route_refused_without_the_right_token(guarded):
    client, store, schema, values = guarded
    requests = _requests(schema, values)
    assert len(requests) == 11
    requests += [("GET", "/docs", {}), ("GET", "/openapi.json", {}), ("GET", "/nowhere", {}),
                 ("GET", "/uix", {}), ("GET", "/ui-jobs", {}), ("GET", "/static/jobs.js", {}),
                 ("OPTIONS", "/jobs", {}), ("HEAD", f"/jobs/{values['job_id']}", {})]
    before = snapshot(store)
    refused = 0
    for what, header in WRONG.items():
        for method, url, kwargs in requests:
            if url == "/healthz":
                continue
            headers = {**kwargs.get("headers", {}), **_auth(header)}
            r = client.request(method, url, **{**kwargs, "headers": headers})
            assert r.status_code == 401, (what, method, url, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                reason = "missing" if header is None else "wrong"
                assert r.json() == {"detail": f"{reason} bearer token: send 'Authorization: "
                                              "Bearer <token>'"}, (what, url)
            refused += 1
    assert refused == len(WRONG) * (len(requests) - 1)
    assert snapshot(store) == before  # nothing happened: no job, no upload, no cancel
    assert client.get("/healthz").status_code == 200  # open, for load balancers


def test_the_right_token_opens_every_route(guarded):
    client, store, schema, values = guarded
    expected = {("POST", "/jobs"): 202, ("POST", "/models"): 201, ("DELETE", "/jobs/"): 200}
    for method, url, kwargs in _requests(schema, values):
        headers = {**kwargs.get("headers", {}), "Authorization": RIGHT}
        r = client.request(method, url, **{**kwargs, "headers": headers})
        want = next((code for (m, prefix), code in expected.items()
                     if m == method and url.startswith(prefix)), 200)
        assert r.status_code == want, (method, url, r.text)
    # The scheme is case-insensitive (RFC 7235); spaces around the token are tolerated.
    for header in (b"bearer " + TOKEN.encode(), b"BEARER  " + TOKEN.encode() + b" "):
        assert client.get("/jobs", headers={"Authorization": header}).status_code == 200
    assert client.get("/docs", headers={"Authorization": RIGHT}).status_code == 200


def test_token_bytes_must_match_exactly():
    """On the byte level (the test client re-encodes headers as UTF-8, a real one need not):
    the header's raw bytes (ASGI hands them over decoded as latin-1) against the token's
    UTF-8 bytes."""
    assert token_matches(RIGHT.decode("latin-1"), TOKEN)
    assert not token_matches("Bearer " + TOKEN, TOKEN)  # its characters sent as latin-1 bytes
    assert not token_matches(None, TOKEN) and not token_matches("", TOKEN)
    assert not token_matches("Bearer", TOKEN)


def test_token_compared_in_constant_time(guarded, monkeypatch):
    client = guarded[0]
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(api.deps.hmac, "compare_digest", spy)
    assert client.get("/jobs", headers={"Authorization": RIGHT}).status_code == 200
    assert client.get("/jobs", headers={"Authorization": b"Bearer nope"}).status_code == 401
    assert calls == [(bytes, bytes)] * 2  # every comparison, right or wrong, goes through it


SHELL = ["/ui", "/ui/", "/ui/jobs/{job_id}", "/ui/jobs/{done_id}", "/ui/jobs/nonsense",
         "/ui/static/common.js", "/ui/static/jobs.js", "/ui/static/job.js",
         "/ui/static/chart.js", "/ui/static/style.css"]


def test_dashboard_shell_is_open_and_carries_no_job_data(guarded):
    """Without the token the shell loads (so that it can ask for the token), and nothing in it
    comes from the store: the same bytes with and without the token, and none of the stored
    jobs' ids, requests or results, the artifact's or the upload's id or name."""
    client, store, _, values = guarded
    secret = store.create_job({"model": "secret-model-7f3a", "quant": {"w_bits": 5}})
    store.claim_next("w")
    store.finish(secret.id, {"top1": 0.123456, "note": "result-marker-91"}, {})
    done_id = next(j.id for j in store.list_jobs("succeeded")[0] if j.id != secret.id)
    ids = {**values, "done_id": done_id}
    private = [secret.id, done_id, values["job_id"], values["artifact_id"], values["model_id"],
               "secret-model-7f3a", "0.123456", "result-marker-91", "m.safetensors"]
    seen = set()
    for path in SHELL:
        url = path.format(**ids)
        for header in (None, b"Bearer wrong", RIGHT):
            r = client.get(url, headers=_auth(header), follow_redirects=False)
            if url == "/ui/":  # not a page: the router's redirect to /ui, open all the same
                assert r.status_code == 307 and r.headers["location"].endswith("/ui")
                continue
            assert r.status_code == 200, (url, header, r.status_code)
            assert not any(p in r.text for p in private), url
            assert "default-src 'none'" in r.headers["content-security-policy"]
            seen.add((url, r.content))
    assert len(seen) == len(SHELL) - 1  # each file the same whoever asks
    # The pages take nothing from elsewhere: every script and stylesheet is the package's own.
    for page in ("/ui", f"/ui/jobs/{done_id}"):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html
        assert re.findall(r'src="([^"]+)"', html) == [
            "/ui/static/jobs.js" if page == "/ui" else "/ui/static/job.js"]
    assert client.get("/ui/static/jobs.html").status_code == 404  # only via its route
    assert client.get("/ui/static/../../jobs").status_code == 401  # normalised: /jobs


def test_root_redirects_to_the_dashboard(guarded):
    client = guarded[0]
    for header in (None, b"Bearer wrong", RIGHT):
        r = client.get("/", headers=_auth(header), follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui"
        assert r.content == b""  # nothing but the redirect


def test_the_api_behind_the_dashboard_still_needs_the_token(guarded):
    """What the pages fetch: every one 401 without the token, 200 with it."""
    client, _, _, values = guarded
    calls = ["/jobs?limit=50", f"/jobs/{values['job_id']}", f"/jobs/{values['job_id']}/candidates",
             "/models?limit=100", f"/artifacts/{values['artifact_id']}"]
    for url in calls:
        assert client.get(url).status_code == 401, url
        assert client.get(url, headers={"Authorization": RIGHT}).status_code == 200, url
