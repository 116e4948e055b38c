"""Bad input: every kind the reliability issue lists, each a test, on SQLite and PostgreSQL,
answered with a 4xx and a message, and nothing stored changed (every table compared row by row
before and after). Then a property-based run of the whole OpenAPI schema (schemathesis)
against a real server on loopback, without and with a bearer token: no 5xx, no response outside
the schema; the number of cases tried is printed.

``python tests/test_bad_input.py`` prints the catalogue as the markdown table of
docs/reliability.md (the answers measured on SQLite).

Several of these inputs are also tested in ``test_api.py`` (with the routes' other behaviour);
here they are one catalogue, each case with the whole-database check.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, too

from procs import app_in_thread, pg_database  # noqa: E402
from test_api import _handmade_safetensors, _safetensors  # noqa: E402

from api.app import create_app  # noqa: E402
from service.db import upgrade  # noqa: E402
from service.jobspec import JobSpec  # noqa: E402
from service.models import Base  # noqa: E402
from service.settings import Settings, get_settings  # noqa: E402
from service.store import Store  # noqa: E402

MAX_UPLOAD = 8192
UNKNOWN = "0" * 32
JSON = {"content-type": "application/json"}
OCTETS = {"content-type": "application/octet-stream"}


def snapshot(store: Store) -> dict[str, list[tuple]]:
    """Every row of every table, in primary-key order."""
    out = {}
    with store.sessions() as s:
        for table in Base.metadata.sorted_tables:
            rows = s.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


# -- the world the bad requests meet ------------------------------------------------------------


@dataclass
class World:
    client: TestClient
    store: Store
    ids: dict[str, str]
    tmp: Path


def make_world(db_url: str, tmp: Path) -> World:
    upgrade(db_url)
    store = Store.from_url(db_url, chunk_bytes=1024)
    data_root = tmp / "data"
    data_root.mkdir()
    (data_root / "imgs").mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    (data_root / "escape").symlink_to(outside, target_is_directory=True)
    (data_root / "imgs" / "up").symlink_to(data_root / "..", target_is_directory=True)
    settings = Settings(database_url=db_url, data_dir=tmp, data_roots=[data_root],
                        max_upload_bytes=MAX_UPLOAD)
    client = TestClient(create_app(settings, store), raise_server_exceptions=False)
    default = JobSpec().model_dump(mode="json")
    queued = store.create_job(default).id
    running = store.create_job(default).id
    done = store.create_job(default).id
    assert [store.claim_next("w").id for _ in range(2)] == [queued, running]
    store.request_cancel(queued)  # a queued job again: cancelled, then another one queued
    queued = store.create_job(default).id
    # The running job has written its checkpoint already (a dispatcher writes artifacts
    # before it marks the job succeeded; a requeued job writes them again).
    running_artifact = store.add_artifact(running, "checkpoint", "m.safetensors",
                                          "application/octet-stream", b"partial").id
    store.claim_next("w")  # done
    done_artifact = store.add_artifact(done, "report", "report.json", "application/json",
                                       b"{}").id
    assert store.finish(done, {"top1": 0.98}, {"total_s": 1.0})
    model = store.add_model("m.safetensors", _safetensors(), MAX_UPLOAD).id
    ids = {"queued": queued, "running": running, "done": done, "model": model,
           "running_artifact": running_artifact, "done_artifact": done_artifact}
    return World(client, store, ids, tmp)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    if request.param == "sqlite":
        w = make_world(f"sqlite:///{tmp / 'tsptq.db'}", tmp)
        yield w
        w.store.engine.dispose()
        return
    with pg_database() as url:
        w = make_world(url, tmp)
        yield w
        w.store.engine.dispose()


# -- the catalogue ------------------------------------------------------------------------------


@dataclass
class Case:
    group: str
    what: str
    method: str
    path: str
    status: int
    message: str  # a piece of the answer's detail
    json_body: Any = None
    content: Any = None  # bytes, or a callable returning an iterator of bytes (streamed)
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def shown(self) -> str:
        """The request as the docs table shows it."""
        if self.json_body is not None:
            body = json.dumps(self.json_body)
        elif isinstance(self.content, bytes):
            body = repr(self.content[:60]) + ("…" if len(self.content) > 60 else "")
        elif self.content is not None:
            body = "(streamed)"
        else:
            body = ""
        query = "?" + "&".join(f"{k}={v!r}" for k, v in self.params.items()) \
            if self.params else ""
        return f"`{self.method} {self.path}{query}` {body}".strip()


def _job(body: Any, status: int, message: str, group: str, what: str) -> Case:
    return Case(group, what, "POST", "/jobs", status, message, json_body=body)


def _raw(content: bytes, status: int, message: str, what: str,
         headers: dict | None = None) -> Case:
    return Case("malformed body", what, "POST", "/jobs", status, message, content=content,
                headers=headers or JSON)


def _upload(content: Any, status: int, message: str, what: str, **params: Any) -> Case:
    return Case("uploads", what, "POST", "/models", status, message, content=content,
                headers=OCTETS, params=params)


def _torch_save() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _stream_too_large():  # no Content-Length: counted as it arrives
    for _ in range(MAX_UPLOAD // 1000 + 2):
        yield bytes(1000)


GOOD = _safetensors()
HEADER_LEN = int.from_bytes(GOOD[:8], "little")

CASES: list[Case] = [
    # malformed JSON and bodies
    _raw(b'{"model": ', 422, "JSON decode error", "malformed JSON (cut short)"),
    _raw(b'{"model": "digits_vit",}', 422, "JSON decode error", "malformed JSON (trailing comma)"),
    _raw(b"", 422, "Field required", "empty body"),
    _raw(b'{"model": "\xff\xfe"}', 400, "error parsing the body", "body not UTF-8"),
    _raw(b'{"search": {"budget_weight_bits": NaN}}', 422, "budget_weight_bits", "NaN"),
    _raw(b'{"search": {"budget_weight_bytes": 1e999}}', 422, "finite number",
         "a number that overflows to infinity"),
    _raw(b"[" * 100_000 + b"]" * 100_000, 400, "error parsing the body",
         "JSON nested 100 000 deep"),
    _raw(b'{"model": "' + b"a" * (2 << 20) + b'"}', 413, "exceeds the limit of 1048576 bytes",
         "a 2 MiB JSON body"),
    _raw(b"model=digits_vit", 422, "model_attributes_type", "form data, not JSON",
         {"content-type": "application/x-www-form-urlencoded"}),
    _job([1, 2], 422, "model_attributes_type", "wrong types", "body a list, not an object"),
    # wrong types (strict: no coercion)
    _job({"quant": {"w_bits": "8"}}, 422, "w_bits", "wrong types", "w_bits a string"),
    _job({"data": {"calib_size": 8.0}}, 422, "calib_size", "wrong types", "calib_size a float"),
    _job({"data": {"calib_size": True}}, 422, "calib_size", "wrong types", "calib_size a bool"),
    _job({"model": 5}, 422, "model", "wrong types", "model a number"),
    _job({"artifacts": {"plots": "no"}}, 422, "plots", "wrong types", "plots a string"),
    _job({"search": None}, 422, "search", "wrong types", "search null"),
    # unknown fields
    _job({"modle": "digits_vit"}, 422, "extra_forbidden", "unknown fields", "top level"),
    _job({"quant": {"bits": 4}}, 422, "extra_forbidden", "unknown fields", "nested"),
    # unknown or unsupported models
    _job({"model": "no_such_model"}, 422, "unknown timm model", "models", "unknown model"),
    _job({"model": "resnet50"}, 422, "unsupported architecture ResNet", "models",
         "unsupported architecture"),
    _job({"model": ""}, 422, "at least 1 character", "models", "empty model name"),
    _job({"model": "x" * 201}, 422, "at most 200 characters", "models", "model name too long"),
    # bit widths out of range
    _job({"quant": {"w_bits": 9}}, 422, "less than or equal to 8", "bit widths", "w_bits 9"),
    _job({"quant": {"w_bits": 1}}, 422, "greater than or equal to 2", "bit widths", "w_bits 1"),
    _job({"quant": {"a_bits": 2}}, 422, "greater than or equal to 3", "bit widths", "a_bits 2"),
    _job({"quant": {"a_bits": 16}}, 422, "less than or equal to 8", "bit widths", "a_bits 16"),
    _job({"search": {"strategy": "greedy", "budget_weight_bits": 1.5}}, 422,
         "budget_weight_bits", "bit widths", "budget below 2 bits"),
    _job({"quant": {"method": "int4"}}, 422, "method", "bit widths", "unknown method"),
    # negative or huge counts
    _job({"data": {"calib_size": -1}}, 422, "calib_size", "counts", "calib_size -1"),
    _job({"data": {"calib_size": 0}}, 422, "calib_size", "counts", "calib_size 0"),
    _job({"data": {"calib_size": 10**6}}, 422, "less than or equal to 1024", "counts",
         "calib_size 10^6"),
    _job({"data": {"val_size": 10**9}}, 422, "val_size", "counts", "val_size 10^9"),
    _job({"data": {"test_limit": -5}}, 422, "test_limit", "counts", "test_limit -5"),
    _job({"search": {"max_candidates": 0}}, 422, "max_candidates", "counts", "max_candidates 0"),
    _job({"search": {"population": 10**12}}, 422, "population", "counts", "population 10^12"),
    _job({"search": {"generations": -1}}, 422, "generations", "counts", "generations -1"),
    _job({"search": {"time_budget_s": 0}}, 422, "time_budget_s", "counts", "time_budget_s 0"),
    _job({"quant": {"seed": 10**40}}, 422, "seed", "counts", "seed 10^40"),
    _job({"quant": {"seed": -1}}, 422, "seed", "counts", "seed -1"),
    _job({"search": {"strategy": "greedy"}}, 422, "needs a budget", "counts",
         "greedy search without a budget"),
    Case("counts", "limit 0", "GET", "/jobs", 422, "greater than or equal to 1",
         params={"limit": 0}),
    Case("counts", "limit 10^6", "GET", "/jobs", 422, "less than or equal to 200",
         params={"limit": 10**6}),
    Case("counts", "offset -1", "GET", "/jobs", 422, "greater than or equal to 0",
         params={"offset": -1}),
    Case("counts", "offset 2^63", "GET", "/jobs", 422, "less than or equal to 2147483647",
         params={"offset": 2**63}),
    Case("counts", "unknown status filter", "GET", "/jobs", 422, "status",
         params={"status": "done"}),
    # paths outside the allowed roots
    _job({"data": {"source": "../etc"}}, 422, "without '..'", "paths", "data: '..'"),
    _job({"data": {"source": "imgs/../../etc"}}, 422, "without '..'", "paths",
         "data: '..' inside"),
    _job({"data": {"source": "/etc"}}, 422, "relative to a data root", "paths",
         "data: absolute path"),
    _job({"data": {"source": "~root"}}, 422, "relative to a data root", "paths", "data: '~'"),
    _job({"data": {"source": "escape"}}, 422, "leaves its data root", "paths",
         "data: symlink out of the root"),
    _job({"data": {"source": "imgs/up"}}, 422, "leaves its data root", "paths",
         "data: symlink to the root's parent"),
    _job({"data": {"source": "missing"}}, 422, "not a directory under any data root", "paths",
         "data: no such directory"),
    _job({"data": {"source": "a\x00b"}}, 422, "not a usable path", "paths", "data: NUL byte"),
    _job({"weights": "/etc/passwd"}, 422, "weights must be", "paths", "weights: absolute path"),
    _job({"weights": "../model.safetensors"}, 422, "weights must be", "paths",
         "weights: relative path"),
    _job({"weights": "file:///etc/passwd"}, 422, "weights must be", "paths", "weights: URL"),
    _job({"weights": "model:../../x"}, 422, "weights must be", "paths",
         "weights: model id with a path"),
    _job({"weights": f"model:{UNKNOWN}"}, 422, "no uploaded model", "paths",
         "weights: unknown upload"),
    # uploads
    _upload(b"this is not a model at all, just text" * 3, 422, "not a safetensors file",
            "not safetensors (text)"),
    _upload(pickle.dumps({"w": [1.0, 2.0]}), 415, "pickle/zip checkpoints are refused",
            "a pickle"),
    _upload(_torch_save(), 415, "pickle/zip checkpoints are refused", "torch.save (zip)"),
    _upload(GOOD[:-5], 422, "truncated safetensors file", "truncated (data)"),
    _upload(GOOD[: 8 + HEADER_LEN // 2], 422, "truncated safetensors file",
            "truncated (header)"),
    _upload(b"abc", 422, "shorter than the 8-byte header", "3 bytes"),
    _upload(b"", 422, "shorter than the 8-byte header", "empty"),
    _upload(GOOD + b"xx", 422, "bad safetensors file", "trailing bytes"),
    _upload(bytes(MAX_UPLOAD + 1), 413, f"exceeds the limit of {MAX_UPLOAD}",
            f"over the limit ({MAX_UPLOAD} + 1 bytes, Content-Length)"),
    _upload(_stream_too_large, 413, f"exceeds the limit of {MAX_UPLOAD}",
            "over the limit (streamed, no Content-Length)"),
    _upload(GOOD, 422, "String should match pattern", "name with a newline", name="a\nb"),
    _upload(GOOD, 422, "at most 255 characters", "name too long", name="x" * 256),
    # unknown ids
    Case("ids", "unknown job", "GET", f"/jobs/{UNKNOWN}", 404, "no job"),
    Case("ids", "malformed job id", "GET", "/jobs/x' OR '1'='1", 404, "no job"),
    Case("ids", "job id with a path", "GET", "/jobs/..%2F..%2Fetc", 404, "Not Found"),
    Case("ids", "unknown job's candidates", "GET", f"/jobs/{UNKNOWN}/candidates", 404,
         "no job"),
    Case("ids", "unknown job's artifacts", "GET", f"/jobs/{UNKNOWN}/artifacts", 404, "no job"),
    Case("ids", "cancel an unknown job", "DELETE", f"/jobs/{UNKNOWN}", 404, "no job"),
    Case("ids", "unknown artifact", "GET", f"/artifacts/{UNKNOWN}", 404, "no artifact"),
    Case("ids", "malformed artifact id", "GET", "/artifacts/' OR 1=1 --", 404, "no artifact"),
    Case("ids", "unknown model", "GET", f"/models/{UNKNOWN}", 404, "no uploaded model"),
    Case("ids", "unknown route", "GET", "/jobs/x/y/z", 404, "Not Found"),
    Case("ids", "method not allowed", "PUT", "/jobs", 405, "Method Not Allowed"),
    # states
    Case("states", "cancel a finished job", "DELETE", "/jobs/{done}", 409,
         "is already succeeded: nothing to cancel"),
    Case("states", "list the artifacts of a running job", "GET", "/jobs/{running}/artifacts",
         409, "is running: artifacts are written when the job succeeds"),
    Case("states", "list the artifacts of a queued job", "GET", "/jobs/{queued}/artifacts", 409,
         "is queued"),
    Case("states", "download an artifact of a running job", "GET",
         "/artifacts/{running_artifact}", 409, "is running: its artifacts can be downloaded "
         "once it has finished"),
]


def _send(world: World, case: Case):
    content = case.content() if callable(case.content) else case.content
    return world.client.request(case.method, case.path.format(**world.ids),
                                json=case.json_body, content=content,
                                headers=case.headers, params=case.params)


def _detail(r) -> str:
    body = r.json()
    assert set(body) == {"detail"}, body
    detail = body["detail"]
    return detail if isinstance(detail, str) else json.dumps(detail)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.what}" for c in CASES])
def test_bad_input(world, case):
    before = snapshot(world.store)
    r = _send(world, case)
    assert r.status_code == case.status, r.text[:500]
    assert r.headers["content-type"] == "application/json"
    assert case.message in _detail(r), r.text[:500]
    assert snapshot(world.store) == before


def test_cancelling_twice(world):
    job_id = world.client.post("/jobs", json={}).json()["id"]
    r = world.client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    before = snapshot(world.store)
    r = world.client.delete(f"/jobs/{job_id}")
    assert r.status_code == 409
    assert f"job {job_id} is already cancelled: nothing to cancel" in _detail(r)
    assert snapshot(world.store) == before
    # A running job: the first cancel flags it (202), asking again changes nothing.
    running = world.ids["running"]
    assert world.client.delete(f"/jobs/{running}").status_code == 202
    before = snapshot(world.store)
    r = world.client.delete(f"/jobs/{running}")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    assert snapshot(world.store) == before


def test_downloads_of_a_finished_job_work(world):
    """The contrast to the running job's 409s: the same routes, once the job has finished."""
    done = world.ids["done"]
    assert [a["id"] for a in world.client.get(f"/jobs/{done}/artifacts").json()] == \
        [world.ids["done_artifact"]]
    r = world.client.get(f"/artifacts/{world.ids['done_artifact']}")
    assert r.status_code == 200 and r.content == b"{}"


def test_upload_limit_comes_from_the_environment(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    monkeypatch.setenv("TSPTQ_DATABASE_URL", url)
    monkeypatch.setenv("TSPTQ_DATA_DIR", str(tmp_path))
    limit = len(GOOD) + 10
    monkeypatch.setenv("TSPTQ_MAX_UPLOAD_BYTES", str(limit))
    assert get_settings().max_upload_bytes == limit
    with TestClient(create_app()) as client:
        r = client.post("/models", content=GOOD + bytes(11), headers=OCTETS)
        assert r.status_code == 413 and f"exceeds the limit of {limit} bytes" in _detail(r)
        assert client.post("/models", content=GOOD, headers=OCTETS).status_code == 201
        # A valid file that begins like a pickle (a header of 128 bytes) is not refused.
        big = _handmade_safetensors(128)
        assert len(big) <= limit
        assert client.post("/models", content=big, headers=OCTETS).status_code == 201


# -- property-based: the whole OpenAPI schema against a real server -----------------------------

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance
except ImportError:  # pragma: no cover - dev dependency
    schemathesis = None

TOKEN = "st-token-0123456789"
# Examples per operation and generation phase (hypothesis' max_examples).
ST_EXAMPLES = int(os.environ.get("TSPTQ_ST_EXAMPLES", "60"))
ST_COUNTS: dict[str, dict[str, Any]] = {}


def _schema(token: str | None):
    """The schema the server serves, taken from the app itself (so the tests can be collected
    before the server starts); the token, if any, goes through schemathesis' auth settings."""
    app = create_app(Settings(database_url="sqlite://", api_token=token))
    config = None
    if token:
        config = schemathesis.Config.from_str(f'[auth.openapi.HTTPBearer]\nbearer = "{token}"\n')
    return schemathesis.openapi.from_dict(app.openapi(), config=config)


@dataclass
class Server:
    url: str
    store: Store


def _serve(tmp: Path, token: str | None) -> Iterator[Server]:
    url = f"sqlite:///{tmp / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url, chunk_bytes=1024)
    (tmp / "data").mkdir()
    (tmp / "data" / "imgs").mkdir()
    settings_ = Settings(database_url=url, data_dir=tmp, data_roots=[tmp / "data"],
                         max_upload_bytes=64 * 1024, api_token=token)
    try:
        with app_in_thread(create_app(settings_, store)) as base:
            yield Server(base, store)
    finally:
        store.engine.dispose()


def _report(request, run: str) -> None:
    counts = ST_COUNTS.get(run, {})
    line = (f"schemathesis ({run}): {counts.get('cases', 0)} cases, statuses "
            f"{dict(sorted(counts.get('statuses', {}).items()))}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, request) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("st-open"), None)
    _report(request, "no token")


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, request) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("st-token"), TOKEN)
    _report(request, "token")


def _call(case, server: Server, run: str) -> None:
    # Any bytes match the upload's schema (a binary string), and a job request that matches
    # its schema may still name a model timm does not know or a directory that is not there:
    # refusing those (4xx) is right, so "schema-valid data is accepted" is not checked there.
    excluded = [positive_data_acceptance] if case.method.upper() == "POST" else []
    response = case.call_and_validate(base_url=server.url, excluded_checks=excluded)
    counts = ST_COUNTS.setdefault(run, {"cases": 0, "statuses": {}})
    counts["cases"] += 1
    counts["statuses"][response.status_code] = counts["statuses"].get(response.status_code,
                                                                      0) + 1


if schemathesis is not None:
    open_schema, token_schema = _schema(None), _schema(TOKEN)
    st_settings = settings(max_examples=ST_EXAMPLES, deadline=None,
                           suppress_health_check=list(HealthCheck))

    @pytest.mark.slow
    @open_schema.parametrize()
    @st_settings
    def test_openapi_property_based(case, open_server):
        _call(case, open_server, "no token")

    @pytest.mark.slow
    @token_schema.parametrize()
    @st_settings
    def test_openapi_property_based_with_token(case, token_server):
        _call(case, token_server, "token")

    def test_openapi_runs_covered_cases():
        """Runs after the two above (pytest keeps file order): neither was vacuous."""
        for run in ST_COUNTS:
            assert ST_COUNTS[run]["cases"] >= 10 * 10, ST_COUNTS


# -- the docs table -----------------------------------------------------------------------------


def markdown_table() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(f"sqlite:///{Path(tmp) / 'tsptq.db'}", Path(tmp))
        lines = ["| kind | input | request | status | message (detail) | stored changed |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for case in CASES:
            before = snapshot(world.store)
            r = _send(world, case)
            detail = _detail(r)
            if detail.startswith("["):
                issues = json.loads(detail)
                detail = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}"
                                   for i in issues)
            detail = detail.replace("|", "\\|").replace("\n", " ")
            detail = detail if len(detail) <= 150 else detail[:150] + "…"
            shown = case.shown().replace("|", "\\|")
            shown = shown if len(shown) <= 90 else shown[:90] + "…`"
            changed = "no" if snapshot(world.store) == before else "**yes**"
            lines.append(f"| {case.group} | {case.what} | {shown} | {r.status_code} | "
                         f"{detail} | {changed} |")
        # Cancelling twice (test_cancelling_twice): the first cancel is the change asked for.
        job_id = world.client.post("/jobs", json={}).json()["id"]
        r = world.client.delete(f"/jobs/{job_id}")
        lines.append(f"| states | cancel a queued job (first time) | `DELETE /jobs/{{id}}` | "
                     f"{r.status_code} | status {r.json()['status']} | yes (cancelled) |")
        before = snapshot(world.store)
        r = world.client.delete(f"/jobs/{job_id}")
        lines.append(f"| states | cancel it again | `DELETE /jobs/{{id}}` | {r.status_code} | "
                     f"{_detail(r)} | {'no' if snapshot(world.store) == before else '**yes**'} |")
        world.store.engine.dispose()
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
