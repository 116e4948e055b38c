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
