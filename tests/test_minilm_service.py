"""The MiniLM text encoder through the service: ``POST /jobs {"model": "minilm"}`` is accepted,
a dispatcher searches it on Ray and stores its artifacts, and the downloaded checkpoint gives
the text metrics the job reported (few texts: this is the wiring, not the benchmark)."""

from __future__ import annotations

import hashlib
import json

import pytest

from quant import load_quantized
from quant.zoo.models import load_model
from quant.zoo.text import evaluate_text, text_data

pytest.importorskip("transformers")

JOB = {"model": "minilm", "data": {"calib_size": 4, "val_size": 8, "test_limit": 24},
       "search": {"strategy": "thresholds", "max_candidates": 3}}




def test_minilm_job_end_to_end(service, tmp_path):
    client, dispatcher = service
    r = client.post("/jobs", json=JOB)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert dispatcher.run_once() == job_id
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job.get("error")
    result = job["result"]
    assert result["search"]["evaluations"] == 3
    assert 0.9 < result["cosine"] <= 1.0 and 0 <= result["nn_agreement"] <= 1

    arts = {a["name"]: a for a in client.get(f"/jobs/{job_id}/artifacts").json()}
    report = json.loads(client.get(f"/artifacts/{arts['report.json']['id']}").content)
    assert report["inputs"] == "texts" and report["test_images"] == 24
    assert "transformers" in report["versions"] and report["corpus_digest"]
    # O-2SF on the LayerNorm inputs and V-2SF on post-Softmax/post-GELU: both plotted.
    assert any("norm" in n or "LayerNorm" in n for n in arts if n.startswith("plots/hist_"))
    ckpt = arts["minilm_tsptq_w8a8.safetensors"]
    blob = client.get(f"/artifacts/{ckpt['id']}").content
    assert hashlib.sha256(blob).hexdigest() == ckpt["sha256"]
    path = tmp_path / "minilm.safetensors"
    path.write_bytes(blob)
    data = text_data(4, 0, test_limit=24)
    measured = evaluate_text(load_model("minilm"), load_quantized(path), data.x_test)
    assert measured["cosine"] == pytest.approx(result["cosine"], abs=1e-6)
    assert measured["nn_agreement"] == result["nn_agreement"]


def test_minilm_refuses_image_data(service):
    client, _ = service
    r = client.post("/jobs", json={"model": "minilm", "data": {"source": "imagenet"}})
    assert r.status_code == 422 and "text encoder" in r.text
