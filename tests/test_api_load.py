"""``bench.api_load`` (the API load benchmark) in small: a few clients for two seconds against a
real server on loopback; the full run is ``python -m bench.api_load`` (docs/reliability.md)."""

from __future__ import annotations

import json

from test_bad_input import _serve

from bench.api_load import main, percentile


def test_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile([3.0], 99) == 3.0


def test_load_run_against_a_real_server(tmp_path, capsys):
    gen = _serve(tmp_path, None)
    server = next(gen)
    try:
        out = tmp_path / "load.json"
        assert main(["--url", server.url, "--clients", "4", "--seconds", "2", "--pause",
                     "0.05", "--json", str(out)]) == 0
    finally:
        gen.close()
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["clients"] == 4
    rows = {r["endpoint"]: r for r in report["rows"]}
    assert set(rows) == {"POST /jobs", "GET /jobs/{id}", "GET /jobs"}
    assert all(r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
               for r in rows.values())
    # Every submitted job was stored, queued (no dispatcher runs here).
    jobs, total = server.store.list_jobs("queued", limit=0)
    assert total == rows["POST /jobs"]["requests"]
    assert "| GET /jobs/{id} |" in capsys.readouterr().out


def test_dashboard_store_is_filled_with_real_rows(tmp_path):
    from bench.api_load import seed_dashboard
    from service.db import upgrade
    from service.store import Store

    url = f"sqlite:///{tmp_path / 'tsptq.db'}"
    upgrade(url)
    job_id = seed_dashboard(url)
    store = Store.from_url(url)
    try:
        assert store.list_jobs(limit=0)[1] == 50
        assert {s: store.list_jobs(s, limit=0)[1] for s in
                ("queued", "running", "succeeded", "failed", "cancelled")} == \
            dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 10)
        assert len(store.candidates(job_id)) == 500
        assert {a.kind for a in store.artifacts(job_id)} == {"report", "checkpoint", "plot"}
    finally:
        store.engine.dispose()


def test_dashboard_mode_against_a_real_server(tmp_path, capsys):
    out = tmp_path / "dashboard.json"
    assert main(["--dashboard", "--clients", "3", "--seconds", "2", "--pause", "0.05",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "dashboard" and report["errors"] == 0
    assert report["jobs"] == 50 and report["candidates"] == 500
    rows = {r["endpoint"]: r for r in report["rows"]}
    assert {"GET /ui", "GET /ui/jobs/{id}", "GET /jobs", "GET /jobs/{id}",
            "GET /jobs/{id}/candidates", "GET /jobs/{id}/artifacts"} <= set(rows)
    assert all(r["requests"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
               for r in rows.values())
    assert "| GET /jobs/{id}/candidates |" in capsys.readouterr().out
