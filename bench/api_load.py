"""API load benchmark (issue "Reliability and security"): concurrent clients submit jobs and poll
them against a real server on loopback; latency per endpoint and the error count.

    python -m bench.api_load [--clients 50] [--seconds 30] [--pause 0.5] [--polls 4]
                             [--json PATH] [--url URL] [--token TOKEN]
    python -m bench.api_load --dashboard [--clients 10] [--seconds 30] [--pause 0.5]

``--dashboard`` measures the dashboard instead: the server's store is first filled, through
``Store``, with 50 jobs of every status and, on one succeeded job, 500 candidates, its report
(per-layer table), checkpoint and plots; then each client loads what a person's browser loads,
again and again: the jobs page (``/ui``, its script, ``GET /jobs?limit=50``, ``GET /models``)
and that job's page (``/ui/jobs/{id}``, its script, ``GET /jobs/{id}``, its candidates and its
artifacts), pausing ``--pause`` seconds between requests. Target: p99 under 200 ms for each.

Without ``--url`` it starts ``tsptq serve --api-only`` itself on a free port (SQLite in a
temporary directory, no dispatcher: submitted jobs stay queued) and stops it afterwards. With
``--url`` it loads a running service (jobs submitted there are real: point it at a service
without dispatchers, or expect them to run).

Each client is an ``httpx.AsyncClient`` of its own (its own keep-alive connection) looping until
the time is up: ``POST /jobs`` with a small job, then ``GET /jobs/{id}`` ``--polls`` times (as
``tsptq submit --wait`` does), then ``GET /jobs?limit=20``, waiting ``--pause`` seconds before
each request but the submission (a client polling its job; the clients start spread over one
pause). ``--pause 0`` sends back to back: a stress test, where every client always has a
request waiting, so latency is clients / throughput (Little's law). A request is an error when
it fails or answers any status but the expected one (202 or 200). The load generator and the
server share the machine's cores; the CPU each spends per request is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

JOB = {"model": "digits_vit", "data": {"calib_size": 8, "val_size": 32, "test_limit": 90},
       "artifacts": {"plots": False}}
ENDPOINTS = ("POST /jobs", "GET /jobs/{id}", "GET /jobs")
TARGET_P99_MS = 100.0  # GET /jobs/{id}
# What the dashboard's two pages fetch (api/ui/jobs.js, api/ui/job.js), in that order.
DASHBOARD_CALLS = (
    ("GET /ui", "/ui"), ("GET /ui/static/jobs.js", "/ui/static/jobs.js"),
    ("GET /jobs", "/jobs?limit=50"), ("GET /models", "/models?limit=100"),
    ("GET /ui/jobs/{id}", "/ui/jobs/{id}"), ("GET /ui/static/job.js", "/ui/static/job.js"),
    ("GET /jobs/{id}", "/jobs/{id}"), ("GET /jobs/{id}/candidates", "/jobs/{id}/candidates"),
    ("GET /jobs/{id}/artifacts", "/jobs/{id}/artifacts"))
DASHBOARD_ENDPOINTS = tuple(name for name, _ in DASHBOARD_CALLS)
DASHBOARD_TARGET_P99_MS = 200.0
DASHBOARD_JOBS, DASHBOARD_CANDIDATES = 50, 500


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)

    def record(self, endpoint: str, seconds: float, error: str | None) -> None:
        self.latencies[endpoint].append(seconds)
        if error is not None:
            self.errors[endpoint] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{endpoint}: {error}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def _call(client: httpx.AsyncClient, stats: Stats, endpoint: str, method: str, url: str,
                expect: int, **kwargs) -> httpx.Response | None:
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kwargs)
    except httpx.HTTPError as e:
        stats.record(endpoint, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
        return None
    elapsed = time.perf_counter() - t0
    error = None if r.status_code == expect else f"HTTP {r.status_code}: {r.text[:200]}"
    stats.record(endpoint, elapsed, error)
    return r if error is None else None


async def client_loop(client: httpx.AsyncClient, job: dict, deadline: float, polls: int,
                      pause: float, stats: Stats, start_delay: float) -> None:
    async def wait() -> bool:
        """Pause before the next request; False once the time is up."""
        if pause > 0:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        return time.monotonic() < deadline

    await asyncio.sleep(start_delay)  # clients start spread over one pause, not in lockstep
    async with client:
        while time.monotonic() < deadline:
            r = await _call(client, stats, "POST /jobs", "POST", "/jobs", 202, json=job)
            job_id = r.json()["id"] if r is not None else None
            for _ in range(polls if job_id else 0):
                if not await wait():
                    return
                await _call(client, stats, "GET /jobs/{id}", "GET", f"/jobs/{job_id}", 200)
            if not await wait():
                return
            await _call(client, stats, "GET /jobs", "GET", "/jobs", 200, params={"limit": 20})
            if not await wait():
                return


async def run_load(url: str, clients: int, seconds: float, polls: int, pause: float,
                   token: str | None, job: dict | None = None) -> tuple[Stats, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stats = Stats()
    # Made before the clock starts: making one loads a TLS context (~40 ms of CPU here), which
    # would stall every request in flight meanwhile.
    pool = [httpx.AsyncClient(base_url=url, headers=headers, timeout=30) for _ in range(clients)]
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(*(client_loop(client, job or JOB, deadline, polls, pause, stats,
                                       pause * k / clients) for k, client in enumerate(pool)))
    return stats, time.monotonic() - t0


async def dashboard_loop(client: httpx.AsyncClient, job_id: str, deadline: float, pause: float,
                         stats: Stats, start_delay: float) -> None:
    await asyncio.sleep(start_delay)
    async with client:
        while True:
            for endpoint, url in DASHBOARD_CALLS:
                if time.monotonic() >= deadline:
                    return
                await _call(client, stats, endpoint, "GET", url.replace("{id}", job_id), 200)
                if pause > 0:
                    await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


async def run_dashboard(url: str, clients: int, seconds: float, pause: float, job_id: str,
                        token: str | None) -> tuple[Stats, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stats = Stats()
    pool = [httpx.AsyncClient(base_url=url, headers=headers, timeout=30) for _ in range(clients)]
    t0 = time.monotonic()
    await asyncio.gather(*(dashboard_loop(c, job_id, t0 + seconds, pause, stats,
                                          pause * k / clients) for k, c in enumerate(pool)))
    return stats, time.monotonic() - t0


def seed_dashboard(db_url: str, jobs: int = DASHBOARD_JOBS,
                   candidates: int = DASHBOARD_CANDIDATES) -> str:
    """Fill the store at ``db_url`` as a busy service's would be: ``jobs`` jobs (a fifth of them
    succeeded, then running, failed, cancelled, queued) and, on the first succeeded one,
    ``candidates`` candidates, a report with a per-layer table, a checkpoint and plots, all
    real rows written through ``Store``. Returns that job's id."""
    import random

    from service.jobspec import JobSpec
    from service.store import Store

    rng = random.Random(0)
    store = Store.from_url(db_url)
    layers = [f"blocks.{b}.{q}" for b in range(12) for q in (
        "norm1.input_q", "attn.qkv.input_q", "attn.qkv.weight_q", "attn.a_q", "attn.proj.input_q",
        "norm2.input_q", "mlp.fc2.input_q")]
    request = JobSpec.model_validate({"search": {"strategy": "greedy", "budget_weight_bits": 6,
                                                 "budget_activation_bits": 6}}).model_dump()
    result = {"top1": 0.9833, "fp32_top1": 0.9861, "agreement": 0.9917, "kl": 0.0012,
              "size_bytes": 209_000, "fp32_size_bytes": 856_000, "compression": 4.1,
              "search": {"key": "0" * 16, "costs": {"weight_bits": 5.9, "activation_bits": 5.9},
                         "message": "stopped by budget"}}
    statuses = ["succeeded", "running", "failed", "cancelled", "queued"]
    per_status = jobs // len(statuses)
    main_id = None
    try:
        for status in statuses:
            for _ in range(per_status if status != "queued" else jobs - 4 * per_status):
                job = store.create_job(request)
                if status == "queued":
                    continue
                store.claim_next("bench")
                if status == "running":
                    store.set_progress(job.id, rng.randrange(300), 321, "search")
                elif status == "failed":
                    store.fail(job.id, "bench: a failed job", {"total_s": 1.0})
                elif status == "cancelled":
                    store.mark_cancelled(job.id)
                else:
                    if main_id is None:
                        main_id = job.id
                        for seq in range(candidates):
                            bits = {n: rng.choice((4, 5, 6, 8))
                                    for n in rng.sample(layers, rng.randrange(1, 12))}
                            store.add_candidate(
                                job.id, f"{seq:016x}", seq, {"bits": bits, "pinned": {}},
                                rng.random() * 0.01, 0.95 + rng.random() * 0.05,
                                {"weight_bits": 5 + rng.random() * 3,
                                 "activation_bits": 5 + rng.random() * 3,
                                 "weight_bytes": rng.randrange(150_000, 220_000),
                                 "bitops": rng.random() * 1e9})
                        report = {"layers": {n: {"kind": "activation", "enabled": True,
                                                 "scheme": "v2sf", "bits": 8,
                                                 "split_threshold": 0.25, "shift": 2,
                                                 "fine_codes": 32} for n in layers}}
                        store.add_artifact(job.id, "report", "report.json", "application/json",
                                           json.dumps(report).encode())
                        store.add_artifact(job.id, "checkpoint", "m.safetensors",
                                           "application/octet-stream", rng.randbytes(200_000))
                        for k in range(6):
                            store.add_artifact(job.id, "plot", f"plots/hist_{k}.png",
                                               "image/png", rng.randbytes(25_000))
                    store.finish(job.id, result, {"total_s": 55.0})
    finally:
        store.engine.dispose()
    assert main_id is not None
    return main_id


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and every process below it (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        for child, p in parents.items():
            if p == parent and child not in tree:
                tree.add(child)
                todo.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def summarize(stats: Stats, elapsed: float,
              endpoints: tuple[str, ...] = ENDPOINTS) -> list[dict]:
    rows = []
    for endpoint in endpoints:
        lat = stats.latencies.get(endpoint, [])
        rows.append({"endpoint": endpoint, "requests": len(lat),
                     "errors": stats.errors.get(endpoint, 0),
                     "per_s": round(len(lat) / elapsed, 1),
                     "p50_ms": round(percentile(lat, 50) * 1000, 1),
                     "p99_ms": round(percentile(lat, 99) * 1000, 1),
                     "max_ms": round(max(lat, default=float("nan")) * 1000, 1)})
    return rows


def table(rows: list[dict]) -> str:
    cols = ["endpoint", "requests", "errors", "per_s", "p50_ms", "p99_ms", "max_ms"]
    head = "| " + " | ".join(cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    body = ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def serve_here(tmp: Path) -> tuple[str, subprocess.Popen]:
    """``tsptq serve --api-only`` on a free port with SQLite in ``tmp``; its URL and process."""
    from service.demo import free_port, start_server

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSPTQ_")}
    env.update({"TSPTQ_DATA_DIR": str(tmp), "HF_HUB_OFFLINE": "1"})
    proc = start_server(port, env, tmp / "server.log", api_only=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {tmp / 'server.log'}:"
                               f"\n{(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not answer /healthz within 120 s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, help="default 50; 10 with --dashboard")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--polls", type=int, default=4, help="GET /jobs/{id} per submitted job")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds a client waits between its requests (default 0.5, as a "
                        "client polling a job; 0: back to back, a stress test)")
    p.add_argument("--job", type=json.loads, default=JOB,
                   help=f"the job submitted, as JSON (default: {json.dumps(JOB)})")
    p.add_argument("--url", help="load this service instead of starting one")
    p.add_argument("--token", default=os.environ.get("TSPTQ_API_TOKEN"),
                   help="bearer token (default: $TSPTQ_API_TOKEN)")
    p.add_argument("--json", type=Path, help="write the rows and settings here")
    p.add_argument("--dashboard", action="store_true",
                   help=f"load the dashboard's pages and the JSON they fetch, with "
                        f"{DASHBOARD_JOBS} jobs and {DASHBOARD_CANDIDATES} candidates stored")
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = 10 if args.dashboard else 50
    if args.dashboard:
        if args.url:
            p.error("--dashboard starts its own server (it fills the store first): no --url")
        if args.clients < 1 or args.seconds <= 0 or args.pause < 0:
            p.error("--clients must be >= 1, --seconds > 0, --pause >= 0")
        return main_dashboard(args)
    if args.clients < 1 or args.seconds <= 0 or args.polls < 0 or args.pause < 0:
        p.error("--clients must be >= 1, --seconds > 0, --polls >= 0, --pause >= 0")

    from service.demo import stop_server

    proc = None
    with tempfile.TemporaryDirectory(prefix="tsptq-load-") as tmp:
        try:
            if args.url:
                url, token = args.url.rstrip("/"), args.token
            else:
                url, proc = serve_here(Path(tmp))
                token = None
            where = "" if args.url else " (tsptq serve --api-only, SQLite)"
            print(f"{args.clients} clients for {args.seconds:g} s, {args.pause:g} s between a "
                  f"client's requests, against {url}{where}", flush=True)
            server_cpu0 = cpu_seconds(proc.pid) if proc is not None else None
            client_cpu0 = time.process_time()
            stats, elapsed = asyncio.run(run_load(url, args.clients, args.seconds, args.polls,
                                                  args.pause, token, args.job))
            client_cpu = time.process_time() - client_cpu0
            server_cpu = cpu_seconds(proc.pid) - server_cpu0 if proc is not None else None
        finally:
            if proc is not None:
                stop_server(proc)
    rows = summarize(stats, elapsed)
    errors = sum(r["errors"] for r in rows)
    print(table(rows))
    p99 = next(r["p99_ms"] for r in rows if r["endpoint"] == "GET /jobs/{id}")
    print(f"\nerrors: {errors}; p99 of GET /jobs/{{id}}: {p99} ms (target < {TARGET_P99_MS:g} ms"
          f": {'met' if errors == 0 and p99 < TARGET_P99_MS else 'missed'})")
    requests = sum(r["requests"] for r in rows)
    cpu = {"client_cpu_ms_per_request": round(client_cpu * 1000 / max(requests, 1), 2),
           "server_cpu_ms_per_request": None if server_cpu is None
           else round(server_cpu * 1000 / max(requests, 1), 2)}
    print(f"{requests / elapsed:.0f} requests/s; CPU per request: load generator "
          f"{cpu['client_cpu_ms_per_request']} ms, server "
          f"{cpu['server_cpu_ms_per_request'] if server_cpu is not None else '?'} ms "
          f"({os.cpu_count()} cores shared)")
    report(stats, args.json, {
        "clients": args.clients, "seconds": args.seconds, "polls": args.polls,
        "pause_s": args.pause, "job": args.job, "url": args.url,
        "elapsed_s": round(elapsed, 2), "errors": errors, "rows": rows, **cpu})
    return 0 if errors == 0 else 1


def report(stats: Stats, path: Path | None, payload: dict) -> None:
    """Print the failed requests' examples; write ``payload`` (with them) to ``path``."""
    for example in stats.examples:
        print(f"  {example}", file=sys.stderr)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**payload, "error_examples": stats.examples}, indent=2))


def main_dashboard(args: argparse.Namespace) -> int:
    from service.demo import stop_server

    with tempfile.TemporaryDirectory(prefix="tsptq-dash-") as tmp:
        url, proc = serve_here(Path(tmp))
        try:
            t0 = time.perf_counter()
            job_id = seed_dashboard(f"sqlite:///{Path(tmp) / 'tsptq.db'}")
            print(f"stored {DASHBOARD_JOBS} jobs and {DASHBOARD_CANDIDATES} candidates (on job "
                  f"{job_id}) in {time.perf_counter() - t0:.1f} s", flush=True)
            print(f"{args.clients} clients loading the dashboard's pages for {args.seconds:g} s, "
                  f"{args.pause:g} s between a client's requests, against {url} (tsptq serve "
                  "--api-only, SQLite)", flush=True)
            server_cpu0 = cpu_seconds(proc.pid)
            stats, elapsed = asyncio.run(run_dashboard(url, args.clients, args.seconds,
                                                       args.pause, job_id, None))
            server_cpu = cpu_seconds(proc.pid) - server_cpu0
        finally:
            stop_server(proc)
    rows = summarize(stats, elapsed, DASHBOARD_ENDPOINTS)
    errors = sum(r["errors"] for r in rows)
    print(table(rows))
    worst = max(rows, key=lambda r: r["p99_ms"])
    met = errors == 0 and worst["p99_ms"] < DASHBOARD_TARGET_P99_MS
    print(f"\nerrors: {errors}; worst p99: {worst['p99_ms']} ms ({worst['endpoint']}); target "
          f"< {DASHBOARD_TARGET_P99_MS:g} ms for every one: {'met' if met else 'missed'}")
    requests = sum(r["requests"] for r in rows)
    server_ms = round(server_cpu * 1000 / max(requests, 1), 2)
    print(f"{requests / elapsed:.0f} requests/s; server CPU {server_ms} ms per request "
          f"({os.cpu_count()} cores shared with the load generator)")
    report(stats, args.json, {
        "mode": "dashboard", "clients": args.clients, "seconds": args.seconds,
        "pause_s": args.pause, "jobs": DASHBOARD_JOBS, "candidates": DASHBOARD_CANDIDATES,
        "elapsed_s": round(elapsed, 2), "errors": errors, "rows": rows,
        "target_p99_ms": DASHBOARD_TARGET_P99_MS, "target_met": met,
        "server_cpu_ms_per_request": server_ms})
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
