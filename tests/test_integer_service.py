"""The integer setting through the service: ``POST /jobs {"quant": {"setting": "integer"}}`` is
accepted unchanged, a dispatcher runs a tiny search of the digits ViT on Ray, and report.json
lists the integer program per layer (multipliers, shifts, worst-case accumulator bits); the job
stores its ONNX model (artifact kind ``onnx``), which ONNX Runtime runs bit-identically to the
integer engine, with its ONNX Runtime accuracy in the result beside the simulator's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx as onnx_lib
import onnxruntime as ort

from export.cpu import s8s8_is_exact
from quant.integer import IntegerEngine
from quant.zoo.data import digits_data
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
    # the unset fields as the checkpoint records them (timm ViT, integer setting)
    assert report["config"]["weight_rounding"] is None
    assert report["family_choices"]["weight_rounding"] == "nearest"
    assert report["family_choices"]["coarse_offset"] is True
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
    assert job["progress"]["stage"] == "artifacts"

    # the deployable model: its ONNX file, measured in ONNX Runtime on the same 90 test images
    onnx = job["result"]["onnx"]
    assert onnx["available"] is True and onnx["bit_identical_to_engine"] is True
    assert onnx["form"] == "integer" and onnx["agreement_with_simulator"] == 1.0
    for key in ("top1", "fp32_top1", "agreement", "kl"):  # bit-identical logits: equal metrics
        assert onnx[key] == job["result"][key], key
    assert onnx["runtime"].startswith("onnxruntime ")


def _download(client, artifact, path):
    r = client.get(f"/artifacts/{artifact['id']}")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == artifact["sha256"] == (
        r.headers["x-content-sha256"])
    assert len(r.content) == artifact["size"]
    path.write_bytes(r.content)
    return path


def test_integer_job_stores_its_onnx_model(service, tmp_path, monkeypatch):
    client, dispatcher = service
    stages = []
    set_progress = dispatcher.store.set_progress

    def spy(job_id, done, total, stage):
        stages.append(stage)
        return set_progress(job_id, done, total, stage)

    monkeypatch.setattr(dispatcher.store, "set_progress", spy)
    job_id = client.post("/jobs", json={**JOB, "search": {"strategy": "none"}}).json()["id"]
    assert dispatcher.run_once() == job_id
    # the ONNX export and its measurement are a stage of their own, before the last artifacts
    assert "onnx" in stages and stages.index("onnx") > stages.index("search")
    assert stages[-1] == "artifacts"
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job.get("error")
    arts = client.get(f"/jobs/{job_id}/artifacts").json()
    by_kind = {a["kind"]: a for a in arts}
    assert {"checkpoint", "report", "onnx"} <= set(by_kind)
    assert by_kind["onnx"]["name"] == "digits_vit_tsptq_w8a8.onnx"
    assert by_kind["onnx"]["size"] == job["result"]["onnx"]["size_bytes"]
    onnx_path = _download(client, by_kind["onnx"], tmp_path / "model.onnx")
    ckpt = _download(client, by_kind["checkpoint"], tmp_path / "model.safetensors")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = digits_data().x_test[:8]
    (logits,) = session.run(None, {"images": images.numpy()})
    ref = IntegerEngine.load(ckpt)(images).numpy()
    assert logits.dtype == np.float32 and logits.shape == (8, 10)
    assert np.array_equal(logits, ref)
    onnx = job["result"]["onnx"]
    assert onnx["bit_identical_to_engine"] is True
    assert onnx["top1"] == job["result"]["top1"] and onnx["agreement"] == job["result"]["agreement"]


def test_full_setting_job_stores_its_fast_graph(service):
    """A full-setting job has no integer program (no integer report), but it is deployable too:
    its ONNX artifact is the fast QDQ graph of its quantizers, measured in ONNX Runtime beside
    the simulator, and the downloaded file runs on an image."""
    client, dispatcher = service
    job = {**JOB, "quant": {"setting": "full"}, "search": {"strategy": "none"}}
    job_id = client.post("/jobs", json=job).json()["id"]
    assert dispatcher.run_once() == job_id
    done = client.get(f"/jobs/{job_id}").json()
    assert done["status"] == "succeeded"
    assert "integer" not in _report(client, job_id)
    arts = {a["kind"]: a for a in client.get(f"/jobs/{job_id}/artifacts").json()}
    assert "onnx" in arts
    onnx = done["result"]["onnx"]
    assert onnx["available"] is True and onnx["form"] == "qdq", onnx
    assert onnx["agreement_with_simulator"] >= 0.97
    assert abs(onnx["top1"] - done["result"]["top1"]) <= 0.03
    model = client.get(f"/artifacts/{arts['onnx']['id']}").content
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"images": digits_data().x_test[:2].numpy()})
    assert logits.shape == (2, 10)
    assert onnx["operands"] == "u8u8" and onnx["exact_on_any_cpu"] is True

    # the int8 × int8 form asked for: the same quantizers, int8 storage, said in the result
    s8_job = {**job, "artifacts": {"plots": False, "onnx_operands": "s8s8"}}
    s8_id = client.post("/jobs", json=s8_job).json()["id"]
    assert dispatcher.run_once() == s8_id
    s8 = client.get(f"/jobs/{s8_id}").json()["result"]["onnx"]
    assert s8["operands"] == "s8s8" and s8["exact_on_any_cpu"] is False
    s8_art = next(a for a in client.get(f"/jobs/{s8_id}/artifacts").json() if a["kind"] == "onnx")
    s8_model = onnx_lib.load_from_string(client.get(f"/artifacts/{s8_art['id']}").content)
    assert any(t.data_type == onnx_lib.TensorProto.INT8 and len(t.dims) == 2
               for t in s8_model.graph.initializer)
    if s8s8_is_exact():  # the same integer sums: the same test metrics
        assert (s8["top1"], s8["agreement_with_simulator"]) == (
            onnx["top1"], onnx["agreement_with_simulator"])
    bad = client.post("/jobs", json={**job, "artifacts": {"onnx_operands": "s4s4"}})
    assert bad.status_code == 422 and "onnx_operands" in bad.text
