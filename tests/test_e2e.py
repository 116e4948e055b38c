"""The README's main job against a real ``tsptq serve`` subprocess on a free port: submit the
digits job over HTTP, follow it, download the checkpoint, check its sha256 and that its accuracy
on the test split equals the reported one; then the same through ``tsptq demo``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from quant import load_quantized
from quant.evaluate import compare, logits_of
from quant.zoo.data import digits_data
from quant.zoo.models import load_model
from service.client import ServiceClient
from service.demo import free_port, start_server, stop_server, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture()
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "TSPTQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    proc = start_server(port, env, tmp_path / "server.log")
    client = ServiceClient(f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_healthy(client, proc)
        yield client
    finally:
        client.close()
        stop_server(proc)
    assert proc.returncode is not None


def test_main_job_over_http(server, tmp_path):
    job = server.submit({"model": "digits_vit", "data": {"test_limit": 120}})
    assert job["status"] == "queued"
    seen = []
    job = server.wait(job["id"], poll_s=0.3, timeout_s=300, on_progress=seen.append)
    assert job["status"] == "succeeded", job["error"]
    assert {j["status"] for j in seen} >= {"succeeded"}
    assert job["progress"]["done"] == job["progress"]["total"] == 1
    listing = server.artifacts(job["id"])
    assert {a["kind"] for a in listing} == {"checkpoint", "report", "plot", "onnx"}
    # the deployable file: the fast graph of this full-setting job, run in ONNX Runtime
    import onnxruntime as ort

    onnx_file = server.download(next(a for a in listing if a["kind"] == "onnx"), tmp_path)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    sample = digits_data(test_limit=120)  # the job's test sample (class-stratified, seeded)
    (ort_logits,) = session.run(None, {"images": sample.x_test.numpy()})
    ort_top1 = float((ort_logits.argmax(1) == sample.y_test.numpy()).mean())
    assert ort_top1 == pytest.approx(job["result"]["onnx"]["top1"], abs=1e-6)
    ckpt = next(a for a in listing if a["kind"] == "checkpoint")
    path = server.download(ckpt, tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ckpt["sha256"]
    x, y = sample.x_test, sample.y_test
    measured = compare(logits_of(load_model("digits_vit"), x), logits_of(load_quantized(path), x),
                       y)
    assert measured.top1 == pytest.approx(job["result"]["top1"], abs=1e-9)
    assert job["result"]["top1"] >= job["result"]["fp32_top1"] - 0.005  # W8A8: < 0.5 points


def test_demo_command(tmp_path):
    env = {**os.environ, "TSPTQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--out",
                          str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reproduces the reported accuracy: True" in out.stdout
    assert "dashboard: http://127.0.0.1:" in out.stdout  # printed while the job runs
    assert "server stopped" in out.stdout and "stays up" not in out.stdout  # no terminal
    assert list((tmp_path / "out").glob("*.safetensors"))


def test_demo_keeps_serving_for_the_dashboard(tmp_path):
    """``make run`` at a terminal: after the job the server stays up, its dashboard page and
    downloads answer, and Ctrl-C (SIGINT) stops it in order."""
    import signal

    import httpx

    env = {**os.environ, "TSPTQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "demo", "--keep-serving",
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "the server stays up for the dashboard:" in line:
                break
        page = line.split("dashboard: ", 1)[1].split()[0]
        assert "/ui/jobs/" in page, lines
        base, job_id = page.split("/ui/jobs/")
        assert f"follow it in a browser: {page}\n" in lines
        # generous timeouts: on a loaded 2-core machine the server answers slowly (httpx's
        # default is 5 s)
        assert httpx.get(page, timeout=60).status_code == 200
        artifacts = httpx.get(f"{base}/jobs/{job_id}/artifacts", timeout=60).json()
        ckpt = next(a for a in artifacts if a["kind"] == "checkpoint")
        assert hashlib.sha256(httpx.get(base + ckpt["url"], timeout=60).content).hexdigest() == \
            ckpt["sha256"]
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "server stopped" in rest
    with pytest.raises(httpx.TransportError):
        httpx.get(page, timeout=2)
