"""A real-size model through the service: ``deit_small_patch16_224`` (random weights: none can
be downloaded here) on a generated 224² ImageFolder under the server's data root, a greedy
search with a small ``max_candidates``; the job succeeds and its checkpoint is served and runs.
The benchmark (``bench.scale``) runs the same job at full size (10,000 test images)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from bench.imagefolder import FolderSpec, write_image_folder
from quant import load_quantized
from service.client import ServiceClient
from service.demo import free_port, start_server, stop_server, wait_healthy

pytestmark = pytest.mark.slow

JOB = {"model": "deit_small_patch16_224", "weights": "random",
       "data": {"source": "folder", "calib_size": 4, "val_size": 4, "test_limit": 10},
       "search": {"strategy": "greedy", "budget_weight_bits": 6, "max_candidates": 2},
       "artifacts": {"plots": False}}


def test_deit_small_job_on_an_image_folder(tmp_path):
    data_dir = tmp_path / "data"
    write_image_folder(data_dir / "datasets" / "folder",
                       FolderSpec(classes=5, train_per_class=4, val_per_class=3))
    port = free_port()
    env = {**os.environ, "TSPTQ_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
           "TSPTQ_RAY_WORKERS": "1"}
    proc = start_server(port, env, tmp_path / "server.log")
    client = ServiceClient(f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_healthy(client, proc)
        job = client.submit(JOB)
        stages: set[str] = set()
        job = client.wait(job["id"], poll_s=0.5, timeout_s=900,
                          on_progress=lambda j: stages.add(j["progress"].get("stage") or ""))
        assert job["status"] == "succeeded", job["error"]
        result = job["result"]
        assert result["search"]["evaluations"] == 2
        assert result["search"]["stopped_by"] == "max_candidates"
        listing = client.artifacts(job["id"])
        ckpt = next(a for a in listing if a["kind"] == "checkpoint")
        path = client.download(ckpt, tmp_path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ckpt["sha256"]
        report = next(a for a in listing if a["kind"] == "report")
        import json

        report = json.loads(client.download(report, tmp_path).read_text())
        assert report["test_images"] == 10 and report["samples"]["test"]["images"] == 10
        assert report["samples"]["test"]["subset"] == "class-stratified"
    finally:
        client.close()
        stop_server(proc)
    qmodel = load_quantized(path)
    with torch.no_grad():
        assert qmodel(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
