"""The README's main job, end to end over HTTP: start ``tsptq serve`` on the embedded default
(SQLite under TSPTQ_DATA_DIR, a local Ray, the bundled digits ViT), submit a job, follow its
progress, download the quantized checkpoint (sha256 checked), load it with ``load_quantized``,
measure it on the test split, print the result beside what the service reported, and stop the
server. The dashboard's URL is printed as soon as the server is up, so that a person can follow
the job in a browser; at a terminal the server then stays up (``--keep-serving``) until Ctrl-C,
for its page and downloads to be looked at."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .cli_client import _Progress
from .client import ServiceClient, ServiceError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str], log: Path, *,
                 api_only: bool = False) -> subprocess.Popen:
    """``tsptq serve`` (``--api-only``: without its dispatcher) on ``port``, in a session of
    its own (``stop_server`` ends the API and its dispatcher together), logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level",
            "warning"] + (["--api-only"] if api_only else [])
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_healthy(client: ServiceClient, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            client.healthz()
            return
        except ServiceError:
            time.sleep(0.3)
    raise RuntimeError(f"the server did not answer /healthz within {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the API and its dispatcher child
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_demo(args: argparse.Namespace) -> int:
    from quant import load_quantized
    from quant.evaluate import compare, logits_of
    from quant.zoo.data import digits_data
    from quant.zoo.models import load_model

    port = args.port or free_port()
    env = {**os.environ, "TSPTQ_PORT": str(port)}
    if args.data_dir:
        env["TSPTQ_DATA_DIR"] = str(args.data_dir)
    out = Path(args.out)
    keep = keep_serving(args.keep_serving)
    server = start_server(port, env, out / "server.log")
    url = f"http://127.0.0.1:{port}"
    stop_now = True
    try:
        with ServiceClient(url, timeout=60) as client:
            wait_healthy(client, server)
            print(f"server up at {url} (log: {out / 'server.log'})")
            print(f"dashboard: {url}/ui", flush=True)
            spec: dict = {"model": "digits_vit"}
            if args.strategy != "none":
                spec["search"] = {"strategy": args.strategy,
                                  "budget_weight_bits": args.budget_bits,
                                  "budget_activation_bits": args.budget_bits}
            job = client.submit(spec)
            print(f"submitted job {job['id']}: {spec}")
            print(f"follow it in a browser: {url}/ui/jobs/{job['id']}", flush=True)
            progress = _Progress(True)
            try:
                job = client.wait(job["id"], poll_s=0.5, on_progress=progress)
            finally:
                progress.close()
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job.get('error')}", file=sys.stderr)
                return 1
            ckpt = next(a for a in client.artifacts(job["id"]) if a["kind"] == "checkpoint")
            path = client.download(ckpt, out)
            print(f"downloaded {path} ({ckpt['size'] / 1024:.0f} KiB, sha256 {ckpt['sha256']} "
                  "verified)")
        stop_now = not keep
    finally:
        if stop_now:
            stop_server(server)
            print("server stopped")
    try:
        qmodel = load_quantized(path)
        data = digits_data()
        model = load_model("digits_vit")
        measured = compare(logits_of(model, data.x_test), logits_of(qmodel, data.x_test),
                           data.y_test)
        r = job["result"]
        print(f"\n{'':28} {'reported':>9} {'measured':>9}")
        print(f"{'top-1 (test split)':28} {r['top1']:9.2%} {measured.top1:9.2%}")
        print(f"{'FP32 top-1':28} {r['fp32_top1']:9.2%} {measured.fp32_top1:9.2%}")
        print(f"{'agreement with FP32':28} {r['agreement']:9.2%} {measured.agreement:9.2%}")
        print(f"checkpoint {r['size_bytes'] / 1024:.0f} KiB, FP32 "
              f"{r['fp32_size_bytes'] / 1024:.0f} KiB ({r['compression']}× smaller); job "
              f"timings {job['timings']}")
        same = abs(measured.top1 - r["top1"]) < 1e-9
        print(f"the downloaded checkpoint reproduces the reported accuracy: {same}")
        if keep:
            print(f"\nthe server stays up for the dashboard: {url}/ui/jobs/{job['id']} (its "
                  "downloads are there); Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while server.poll() is None:
                    time.sleep(0.5)
    finally:
        if keep:
            stop_server(server)
            print("server stopped")
    return 0 if same else 1


def keep_serving(choice: bool | None) -> bool:
    """``--keep-serving``/``--no-keep-serving``; unset: keep it when a person is at a terminal
    (stdin and stdout are TTYs), never in scripts and CI, where the demo must end."""
    if choice is not None:
        return choice
    return sys.stdin.isatty() and sys.stdout.isatty()


def register(sub) -> None:
    d = sub.add_parser("demo", help="the README's main job: serve, submit the digits job, "
                       "download, load and check the checkpoint, stop")
    d.add_argument("--port", type=int, help="default: a free port")
    d.add_argument("--data-dir", type=Path, help="default: TSPTQ_DATA_DIR or ./.tsptq")
    d.add_argument("--out", default="out", help="where the checkpoint and server log go")
    d.add_argument("--strategy", default="none",
                   choices=("none", "greedy", "thresholds", "evolutionary"))
    d.add_argument("--budget-bits", type=float, default=4.5)
    d.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=None,
                   help="after the job, keep the server (and its dashboard) up until Ctrl-C "
                        "(default: when run at a terminal)")
    d.set_defaults(func=run_demo)
