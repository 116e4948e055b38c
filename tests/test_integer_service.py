"""The integer setting through the service: ``POST /jobs {"quant": {"setting": "integer"}}`` is
accepted unchanged, a dispatcher runs a tiny search of the digits ViT on Ray, and report.json
lists the integer program per layer (multipliers, shifts, worst-case accumulator bits)."""

from __future__ import annotations

import json

from service.jobspec import JobSpec

# Small and quick (as the dispatcher's tests): 8 calibration, 32 validation, 90 test images, two
# candidates, no plots.
JOB = {"model": "digits_vit", "quant": {"setting": "integer"},
       "data": {"calib_size": 8, "val_size": 32, "test_limit": 90},
       "search": {"strategy": "thresholds", "max_candidates": 2},
       "artifacts": {"plots": False}}
ACCUMULATING = ("matmul", "linear", "patch_conv")




def test_jobspec_accepts_the_integer_setting():
    assert JobSpec.model_validate({"quant": {"setting": "integer"}}).quant.setting == "integer"


def _report(client, job_id) -> dict:
    arts = {a["name"]: a for a in client.get(f"/jobs/{job_id}/artifacts").json()}
    return json.loads(client.get(f"/artifacts/{arts['report.json']['id']}").content)


def test_integer_job_reports_its_program(service):
    client, dispatcher = service
    r = client.post("/jobs", json=JOB)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert client.get(f"/jobs/{job_id}").json()["request"]["quant"]["setting"] == "integer"
    assert dispatcher.run_once() == job_id
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["result"]["search"]["evaluations"] == 2
    assert job["result"]["agreement"] > 0.9

    report = _report(client, job_id)
    assert report["config"]["setting"] == "integer"
    rows = report["integer"]
    layers = {row["layer"] for row in rows}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.av", "blocks.0.mlp.fc2",
            "blocks.0.norm1", "head"} <= layers
    acc = [row for row in rows if row["op"] in ACCUMULATING]
    assert len(acc) > 5
    for row in acc:  # every integer matmul's worst case fits its int32 accumulator
        assert isinstance(row["worst_case_bits"], int) and row["worst_case_bits"] <= 32, row
        assert row["chunks"] >= 1
    # the scale changes: a dyadic multiplier and shift each (per tensor or a per-channel range)
    requant = [row for row in rows if row["op"] == "requant"]
    assert requant and all({"multiplier", "shift"} <= set(row["rq"]) for row in requant)
    encodes = [row for row in rows if row["op"] == "encode" and row["scheme"] == "uniform"]
    assert encodes and all({"multiplier", "shift"} <= set(row["rescale"]) for row in encodes)
    softmax = [row for row in rows if row["op"] == "softmax"]
    assert softmax and all(row["scheme"] == "v2sf" for row in softmax)  # TSPTQ's post-Softmax


def test_full_setting_has_no_integer_report(service):
    client, dispatcher = service
    job = {**JOB, "quant": {"setting": "full"}, "search": {"strategy": "none"}}
    job_id = client.post("/jobs", json=job).json()["id"]
    assert dispatcher.run_once() == job_id
    assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    assert "integer" not in _report(client, job_id)
