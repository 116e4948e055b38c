"""The client, the CI gate and the client commands of ``tsptq``.

The gate's logic is tested alone; the client and the commands against a real server (uvicorn in
a thread, on a fresh SQLite database per test). Finished jobs are made through the store
(create → claim → artifacts → finish), or by a stand-in dispatcher thread for ``--wait``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from procs import app_in_thread, free_port
from safetensors.torch import save_file
from sqlalchemy import update

from service import cli, cli_client
from service.client import ChecksumError, ServiceClient, ServiceError
from service.db import upgrade
from service.gate import GateError, GateInput, evaluate
from service.jobspec import JobSpec
from service.models import ArtifactChunk
from service.settings import Settings
from service.store import Store

PASSING = {"top1": 0.984, "fp32_top1": 0.986, "agreement": 0.99, "kl": 1e-3,
           "size_bytes": 120_000, "fp32_size_bytes": 450_000}
FAILING = {**PASSING, "top1": 0.97}  # 1.6 points below FP32
# an integer-setting job whose deployed ONNX model measures 1.6 points below FP32 in ONNX Runtime
# (made up for the gate: a real one is bit-identical to the simulator, tests/test_integer_service)
WITH_ONNX = {**PASSING, "onnx": {**FAILING, "available": True,
                                 "bit_identical_to_engine": False}}
NO_ONNX = {**PASSING, "onnx": {"available": False, "reason": "only the integer setting makes "
                                                             "an ONNX model; this is 'full'"}}


def run(*argv: str | Path) -> int:
    """``tsptq ARGV`` in-process, through the real entry point."""
    return cli.main([str(a) for a in argv])


def test_register_adds_the_client_commands():
    p = argparse.ArgumentParser(prog="tsptq")
    sub = p.add_subparsers(dest="command", required=True)
    cli_client.register(sub)
    assert set(sub.choices) == {"submit", "status", "cancel", "download", "gate"}
    args = p.parse_args(["gate", "--job", "x", "--max-drop", "0.5"])
    assert callable(args.func) and args.max_drop == 0.5 and args.max_regression == 0.5
    assert {"submit", "status", "cancel", "download", "gate"} <= set(
        next(a for a in cli.build_parser()._actions
             if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("TSPTQ_URL", "TSPTQ_API_TOKEN", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(var, raising=False)


# -- the gate alone -------------------------------------------------------------------------------


def test_gate_passes_within_the_drop():
    report = evaluate(GateInput(PASSING, max_drop=0.5))
    assert report.passed and [c.name for c in report.checks] == ["drop_vs_fp32"]
    check = report.checks[0]
    assert check.value == pytest.approx(0.2) and check.limit == 0.5 and check.passed
    assert "no baseline" in report.to_markdown()


def test_gate_drop_of_exactly_the_limit_passes_and_a_gain_never_fails():
    assert evaluate(GateInput({"top1": 0.981, "fp32_top1": 0.986}, max_drop=0.5)).passed
    better = evaluate(GateInput({"top1": 0.99, "fp32_top1": 0.98}, baseline={"top1": 0.95},
                                max_drop=0, max_regression=0))
    assert better.passed and all(c.value < 0 for c in better.checks)


def test_gate_fails_on_drop_vs_fp32():
    report = evaluate(GateInput(FAILING, max_drop=0.5))
    assert not report.passed and report.failures[0].name == "drop_vs_fp32"
    assert report.failures[0].value == pytest.approx(1.6)
    assert "REGRESSION" in report.failures[0].message


def test_gate_baseline_regression_and_report_as_baseline():
    first = evaluate(GateInput({**PASSING, "top1": 0.986}, max_drop=0.5, job_id="a" * 32,
                               request={"model": "digits_vit"}))
    baseline = json.loads(first.to_json())  # a run's --json-out is the next baseline
    assert baseline["format"] == "tsptq-gate/1" and baseline["result"]["top1"] == 0.986
    report = evaluate(GateInput(PASSING, baseline=baseline, max_drop=0.5, max_regression=0.1,
                                request={"model": "other"}))
    names = {c.name: c for c in report.checks}
    assert names["drop_vs_fp32"].passed
    assert not names["regression_vs_baseline"].passed
    assert names["regression_vs_baseline"].value == pytest.approx(0.2)
    assert report.baseline == {"top1": 0.986, "job_id": "a" * 32}
    assert any("different request" in n for n in report.notes)
    # a bare job result is a baseline too
    assert evaluate(GateInput(PASSING, baseline={"top1": 0.985}, max_drop=0.5)).passed


@pytest.mark.parametrize("result, baseline", [
    ({"fp32_top1": 0.9}, None),
    ({"top1": "0.9", "fp32_top1": 0.9}, None),
    ({"top1": 98.4, "fp32_top1": 98.6}, None),  # percentages, not fractions
    ({"top1": float("nan"), "fp32_top1": 0.9}, None),
    (PASSING, {"result": {}}),
    (PASSING, [0.9]),
])
def test_gate_refuses_what_it_cannot_judge(result, baseline):
    with pytest.raises(GateError):
        evaluate(GateInput(result, baseline=baseline, max_drop=0.5))


def test_gate_judges_the_onnx_model_when_asked():
    assert evaluate(GateInput(WITH_ONNX, max_drop=0.5)).passed  # the simulator's 98.4%
    report = evaluate(GateInput(WITH_ONNX, max_drop=0.5, artifact="onnx"))
    assert not report.passed and report.failures[0].value == pytest.approx(1.6)
    assert report.result == WITH_ONNX["onnx"] and report.to_dict()["artifact"] == "onnx"
    assert "deployed ONNX model (ONNX Runtime)" in report.to_markdown()
    props = {p.get("name"): p.get("value")
             for p in ET.fromstring(report.to_junit_xml()).iter("property")}
    assert props["artifact"] == "onnx" and props["top1"] == "0.97"
    with pytest.raises(GateError, match="no ONNX Runtime accuracy"):
        evaluate(GateInput(PASSING, max_drop=0.5, artifact="onnx"))  # an older job
    with pytest.raises(GateError, match="only the integer setting makes an ONNX model"):
        evaluate(GateInput(NO_ONNX, max_drop=0.5, artifact="onnx"))
    with pytest.raises(GateError, match="unknown artifact"):
        evaluate(GateInput(PASSING, max_drop=0.5, artifact="tflite"))


def test_gate_refuses_bad_limits():
    with pytest.raises(GateError, match="max_drop"):
        evaluate(GateInput(PASSING, max_drop=-1))


def test_gate_markdown():
    report = evaluate(GateInput(FAILING, baseline={"top1": 0.985}, max_drop=0.5,
                                job_id="b" * 32, request=JobSpec().model_dump(mode="json")))
    md = report.to_markdown()
    assert md.startswith("## tsptq gate: ❌ failed (2 check(s))")
    assert f"job `{'b' * 32}`" in md and "digits_vit (pretrained) on digits" in md
    assert "W8A8" in md and "| top-1 drop vs FP32 | 1.60 pts | ≤ 0.50 pts | ❌ FAIL |" in md
    assert "| top-1 (baseline) | 98.50% |" in md and "3.8× smaller" in md


def test_gate_junit_xml():
    report = evaluate(GateInput(FAILING, baseline={"top1": 0.97}, max_drop=0.5,
                                job_id="c" * 32))
    root = ET.fromstring(report.to_junit_xml())
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["drop_vs_fp32"].find("failure") is not None
    assert cases["regression_vs_baseline"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["job_id"] == "c" * 32 and props["top1"] == "0.97"
    # messages with XML's special characters stay well-formed
    from service.gate import error_junit_xml
    err = ET.fromstring(error_junit_xml('job <x> & "y" failed'))
    assert err.find("testsuite").get("errors") == "1"
    assert err.find("testsuite/testcase/error").get("message") == 'job <x> & "y" failed'


# -- a real server ------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    store: Store
    tmp: Path


def _serve(tmp: Path, token: str | None = None) -> Iterator[Service]:
    from api.app import create_app

    url = f"sqlite:///{tmp / 'tsptq.db'}"
    upgrade(url)
    store = Store.from_url(url, chunk_bytes=1024)  # several chunks per artifact
    settings = Settings(data_dir=tmp / "data", database_url=url, api_token=token)
    try:
        with app_in_thread(create_app(settings, store)) as base:
            yield Service(base, store, tmp)
    finally:
        store.engine.dispose()


@pytest.fixture
def service(tmp_path) -> Iterator[Service]:
    yield from _serve(tmp_path)


def checkpoint_file(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(40, 40, generator=g), "b": torch.arange(10)}, str(path))
    return path


def finished_job(svc: Service, result: dict | None = None, *, status: str = "succeeded",
                 request: dict | None = None, onnx: bool = False) -> str:
    """A job taken through the store to ``status`` (with a checkpoint and a report, and with
    ``onnx`` an ONNX model)."""
    job = svc.store.create_job(request or JobSpec().model_dump(mode="json"))
    claimed = svc.store.claim_next("test-worker")
    assert claimed is not None and claimed.id == job.id
    if status == "succeeded":
        svc.store.set_progress(job.id, 1, 1, "done")
        svc.store.add_artifact(job.id, "checkpoint", "digits_vit_w8a8.safetensors",
                               "application/octet-stream", checkpoint_file(svc.tmp))
        svc.store.add_artifact(job.id, "report", "report.json", "application/json",
                               json.dumps({"result": result}).encode())
        if onnx:
            svc.store.add_artifact(job.id, "onnx", "digits_vit_w8a8.onnx",
                                   "application/octet-stream", b"not really onnx")
        assert svc.store.finish(job.id, result or PASSING, {"total_s": 1.5})
    elif status == "failed":
        assert svc.store.fail(job.id, "calibration diverged")
    else:
        assert svc.store.mark_cancelled(job.id)
    return job.id


class FakeDispatcher:
    """Finishes every queued job with ``result``, reporting progress on the way."""

    def __init__(self, store: Store, result: dict, status: str = "succeeded") -> None:
        self.store, self.result, self.status = store, result, status
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            job = self.store.claim_next("fake")
            if job is None:
                time.sleep(0.05)
                continue
            for done in range(1, 4):
                self.store.set_progress(job.id, done, 3, "candidates")
                time.sleep(0.05)
            if self.status == "succeeded":
                self.store.finish(job.id, self.result, {"total_s": 0.2})
            else:
                self.store.fail(job.id, "out of memory")

    def __enter__(self) -> FakeDispatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# -- client -------------------------------------------------------------------------------------


def test_client_submit_status_list_cancel(service):
    with ServiceClient(service.url) as client:
        job = client.submit({"model": "digits_vit", "quant": {"w_bits": 6, "a_bits": 6}})
        assert len(job["id"]) == 32 and job["status"] == "queued"
        assert client.job(job["id"])["request"]["quant"]["w_bits"] == 6
        page = client.jobs(status="queued")
        assert page["total"] == 1 and page["items"][0]["id"] == job["id"]
        assert client.cancel(job["id"])["status"] == "cancelled"
        with pytest.raises(ServiceError) as e:
            client.cancel(job["id"])
        assert e.value.status == 409 and "already cancelled" in e.value.message
        with pytest.raises(ServiceError) as e:
            client.submit({"quant": {"w_bits": 99}})
        assert e.value.status == 422 and "w_bits" in e.value.message
        with pytest.raises(ServiceError) as e:
            client.job("f" * 32)
        assert e.value.status == 404 and "no job" in e.value.message


def test_client_env_defaults(service, monkeypatch):
    monkeypatch.setenv("TSPTQ_URL", service.url + "/")
    monkeypatch.setenv("TSPTQ_API_TOKEN", "s3cret")
    client = ServiceClient()
    assert client.url == service.url
    assert client._http.headers["authorization"] == "Bearer s3cret"
    client.close()
    with pytest.raises(ValueError, match="http"):
        ServiceClient("localhost:8000")


def test_client_download_verifies(service, tmp_path):
    job_id = finished_job(service, PASSING)
    with ServiceClient(service.url) as client:
        arts = {a["kind"]: a for a in client.artifacts(job_id)}
        assert set(arts) == {"checkpoint", "report"}
        out = tmp_path / "dl"
        out.mkdir()
        path = client.download(arts["checkpoint"], out)
        assert path == out / "digits_vit_w8a8.safetensors"
        data = path.read_bytes()
        assert len(data) == arts["checkpoint"]["size"] > 3 * 1024  # several chunks
        assert hashlib.sha256(data).hexdigest() == arts["checkpoint"]["sha256"]
        assert data == checkpoint_file(tmp_path).read_bytes()
        # an explicit file path
        other = client.download(arts["report"], tmp_path / "r" / "rep.json")
        assert json.loads(other.read_text())["result"]["top1"] == PASSING["top1"]

        # a listing that disagrees with the bytes: refused, nothing left
        wrong = dict(arts["checkpoint"], sha256="0" * 64)
        target = tmp_path / "bad"
        target.mkdir()
        with pytest.raises(ChecksumError, match="X-Content-SHA256"):
            client.download(wrong, target)
        assert list(target.iterdir()) == []
        with pytest.raises(ChecksumError, match="size"):
            client.download(dict(arts["checkpoint"], size=5), target)
        assert list(target.iterdir()) == []


def test_client_download_detects_tampered_bytes(service, tmp_path):
    job_id = finished_job(service, PASSING)
    with ServiceClient(service.url) as client:
        art = next(a for a in client.artifacts(job_id) if a["kind"] == "checkpoint")
        with service.store.sessions.begin() as s:  # flip the bytes, keep the length
            s.execute(update(ArtifactChunk)
                      .where(ArtifactChunk.artifact_id == art["id"], ArtifactChunk.seq == 1)
                      .values(data=b"\0" * 1024))
        out = tmp_path / "dl"
        out.mkdir()
        with pytest.raises(ChecksumError, match="sha256 of the received bytes"):
            client.download(art, out)
        assert list(out.iterdir()) == []


def test_client_upload_candidates_and_wait(service, tmp_path):
    with ServiceClient(service.url) as client:
        up = client.upload_model(checkpoint_file(tmp_path), name="mine.safetensors")
        assert up["weights"] == f"model:{up['id']}"
        job = client.submit({"weights": up["weights"]})
        assert job["request"]["weights"] == up["weights"]
        seen = []
        with FakeDispatcher(service.store, PASSING):
            final = client.wait(job["id"], poll_s=0.02, timeout_s=30,
                                on_progress=lambda j: seen.append(j["progress"]["done"]))
        assert final["status"] == "succeeded" and final["result"] == PASSING
        assert seen[-1] == 3 and seen == sorted(seen)
        service.store.add_candidate(job["id"], "k0", 0, {"bits": 8}, 0.01, 0.99, {"bytes": 1})
        cands = client.candidates(job["id"])
        assert [c["key"] for c in cands] == ["k0"]
        queued = client.submit({})
        with pytest.raises(TimeoutError, match="did not finish"):
            client.wait(queued["id"], poll_s=0.05, timeout_s=0.2)


def test_client_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    with ServiceClient(url, timeout=2) as client, pytest.raises(ServiceError) as e:
        client.jobs()
    assert e.value.status is None and f"cannot reach the service at {url}" in str(e.value)


def test_client_token(tmp_path):
    gen = _serve(tmp_path, token="s3cret")
    svc = next(gen)
    try:
        with ServiceClient(svc.url) as client, pytest.raises(ServiceError) as e:
            client.jobs()
        assert e.value.status == 401
        with ServiceClient(svc.url, token="s3cret") as client:
            assert client.jobs()["total"] == 0
        assert run("status", "--url", svc.url) == 2
        assert run("status", "--url", svc.url, "--token", "s3cret") == 0
    finally:
        gen.close()


# -- commands -----------------------------------------------------------------------------------


def test_submit_prints_id_and_job_is_queued(service, capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "digits_vit", "quant": {"w_bits": 4, "a_bits": 4,
                                                                 "method": "uniform"}}))
    assert run("submit", "--url", service.url, "--spec", spec, "--w-bits", "6",
               "--strategy", "greedy", "--budget-bits", "5") == 0
    job_id = capsys.readouterr().out.strip()
    job = service.store.get_job(job_id)
    assert job.status == "queued"
    assert job.request["quant"] == {**job.request["quant"], "w_bits": 6, "a_bits": 4,
                                    "method": "uniform"}
    assert job.request["search"]["budget_weight_bits"] == 5.0
    assert job.request["search"]["budget_activation_bits"] == 5.0


def test_submit_uploads_local_weights(service, capsys, tmp_path):
    ckpt = checkpoint_file(tmp_path)
    assert run("submit", "--url", service.url, "--weights", ckpt) == 0
    captured = capsys.readouterr()
    job = service.store.get_job(captured.out.strip())
    assert job.request["weights"].startswith("model:") and "uploaded" in captured.err


def test_submit_wait(service, capsys):
    with FakeDispatcher(service.store, PASSING):
        code = run("submit", "--url", service.url, "--wait", "--poll", "0.05")
    out = capsys.readouterr()
    assert code == 0
    assert "succeeded" in out.out and "top-1 98.40% (FP32 98.60%, drop 0.20 pts)" in out.out
    with FakeDispatcher(service.store, PASSING, status="failed"):
        code = run("submit", "--url", service.url, "--wait", "--poll", "0.05",
                   "--no-progress")
    assert code == 1 and "out of memory" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--w-bits", "99"], "quant.w_bits"),
    (["--strategy", "greedy"], "budget"),
    (["--weights", "/no/such/file.safetensors"], "neither pretrained"),
    (["--spec", "/no/such/spec.json"], "cannot read spec file"),
])
def test_submit_usage_errors(argv, message, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # never reached: refused before sending
    assert run("submit", "--url", url, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run("gate", "--job", "x")  # --max-drop is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run("submit", "--w-bits", "eight")
    assert e.value.code == 2


def test_status(service, capsys):
    job_id = finished_job(service, PASSING)
    assert run("status", job_id, "--url", service.url) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: succeeded" in out and "top-1 98.40%" in out
    assert "digits_vit (pretrained) on digits · tsptq full W8A8" in out
    assert run("status", job_id, "--json", "--url", service.url) == 0
    assert json.loads(capsys.readouterr().out)["result"] == PASSING
    assert run("status", "--url", service.url) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "succeeded" in listing and "(1 shown of 1)" in listing
    assert run("status", "f" * 32, "--url", service.url) == 2
    assert "no job" in capsys.readouterr().err


def test_cancel(service, capsys):
    with ServiceClient(service.url) as client:
        job_id = client.submit({})["id"]
    assert run("cancel", job_id, "--url", service.url) == 0
    assert f"job {job_id} cancelled" in capsys.readouterr().out
    assert run("cancel", job_id, "--url", service.url) == 1
    assert "already cancelled" in capsys.readouterr().err


def test_download_command(service, capsys, tmp_path, monkeypatch):
    job_id = finished_job(service, PASSING)
    monkeypatch.chdir(tmp_path)
    assert run("download", job_id, "--url", service.url) == 0
    line = capsys.readouterr().out.strip()
    sha, path = line.split("  ")
    assert Path(path) == Path("out/digits_vit_w8a8.safetensors")
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
    assert run("download", job_id, "--kind", "all", "--out", "all", "--url", service.url) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "digits_vit_w8a8.safetensors", "report.json"]
    capsys.readouterr()
    assert run("download", job_id, "--kind", "plot", "--url", service.url) == 2
    assert "no plot artifact" in capsys.readouterr().err


def test_download_onnx(service, capsys, tmp_path):
    job_id = finished_job(service, WITH_ONNX, onnx=True)
    assert run("download", job_id, "--kind", "onnx", "--out", tmp_path, "--url",
               service.url) == 0
    sha, path = capsys.readouterr().out.strip().split("  ")
    assert Path(path).name == "digits_vit_w8a8.onnx"
    assert Path(path).read_bytes() == b"not really onnx"
    assert hashlib.sha256(b"not really onnx").hexdigest() == sha
    other = finished_job(service, NO_ONNX)
    assert run("download", other, "--kind", "onnx", "--url", service.url) == 2
    assert "no onnx artifact (it has: checkpoint, report)" in capsys.readouterr().err


def test_download_command_refuses_a_corrupt_download(service, capsys, tmp_path, monkeypatch):
    job_id = finished_job(service, PASSING)
    real = ServiceClient.artifacts

    def wrong_sha(self, jid):
        return [dict(a, sha256="ab" * 32) for a in real(self, jid)]

    monkeypatch.setattr(ServiceClient, "artifacts", wrong_sha)
    out = tmp_path / "dl"
    assert run("download", job_id, "--out", out, "--url", service.url) == 2
    assert "sha256" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_download_while_queued_is_an_error(service, capsys):
    with ServiceClient(service.url) as client:
        job_id = client.submit({})["id"]
    assert run("download", job_id, "--url", service.url) == 2
    assert "queued" in capsys.readouterr().err


# -- gate command -------------------------------------------------------------------------------


def test_gate_pass_writes_everything(service, capsys, tmp_path, monkeypatch):
    job_id = finished_job(service, PASSING)
    step = tmp_path / "step_summary.md"
    step.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    files = {k: tmp_path / "gate" / f"out.{k}" for k in ("json", "xml", "md")}
    code = run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--json-out", files["json"], "--junit", files["xml"], "--summary", files["md"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("## tsptq gate: ✅ passed")
    assert files["md"].read_text() == out
    text = step.read_text()
    assert text.startswith("# earlier step\n") and "## tsptq gate: ✅ passed" in text
    report = json.loads(files["json"].read_text())
    assert report["passed"] and report["job_id"] == job_id and report["result"] == PASSING
    suite = ET.parse(files["xml"]).getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


def test_gate_regression_vs_fp32(service, capsys, tmp_path):
    job_id = finished_job(service, FAILING)
    junit = tmp_path / "junit.xml"
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--junit", junit) == 1
    assert "❌ failed" in capsys.readouterr().out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1"
    assert [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None] == [
        "drop_vs_fp32"]
    # a looser limit lets it through
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "2") == 0


def test_gate_regression_vs_baseline(service, capsys, tmp_path):
    good = finished_job(service, {**PASSING, "top1": 0.986})
    baseline = tmp_path / "ci" / "baseline.json"
    assert run("gate", "--url", service.url, "--job", good, "--max-drop", "0.5",
               "--json-out", baseline) == 0
    worse = finished_job(service, PASSING)  # 0.2 below FP32 (fine), 0.2 below the baseline
    junit = tmp_path / "junit.xml"
    assert run("gate", "--url", service.url, "--job", worse, "--max-drop", "0.5",
               "--baseline", baseline, "--max-regression", "0.1", "--junit", junit) == 1
    assert "top-1 regression vs baseline | 0.20 pts | ≤ 0.10 pts | ❌ FAIL" in (
        capsys.readouterr().out)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert run("gate", "--url", service.url, "--job", worse, "--max-drop", "0.5",
               "--baseline", baseline) == 0  # default --max-regression 0.5


def test_gate_submits_and_waits(service, capsys, tmp_path):
    with FakeDispatcher(service.store, PASSING):
        code = run("gate", "--url", service.url, "--model", "digits_vit", "--w-bits", "8",
                   "--max-drop", "0.5", "--poll", "0.05", "--json-out", tmp_path / "r.json")
    assert code == 0
    captured = capsys.readouterr()
    assert "submitted job" in captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["request"]["model"] == "digits_vit"
    assert service.store.get_job(report["job_id"]).status == "succeeded"


def test_gate_unknown_job_and_unreachable(service, capsys, tmp_path, monkeypatch):
    step = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    junit = tmp_path / "junit.xml"
    assert run("gate", "--url", service.url, "--job", "f" * 32, "--max-drop", "0.5",
               "--junit", junit) == 2
    assert "no job" in capsys.readouterr().err
    assert ET.parse(junit).getroot().find("testsuite").get("errors") == "1"
    assert "⚠️ error" in step.read_text()
    url = f"http://127.0.0.1:{free_port()}"
    assert run("gate", "--url", url, "--job", "f" * 32, "--max-drop", "0.5") == 2
    assert f"cannot reach the service at {url}" in capsys.readouterr().err
    assert run("gate", "--url", url, "--max-drop", "0.5") == 2  # submitting: same


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_gate_unfinished_job_is_an_error(service, capsys, tmp_path, status):
    job_id = finished_job(service, status=status)
    json_out = tmp_path / "report.json"
    junit = tmp_path / "junit.xml"
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--json-out", json_out, "--junit", junit) == 2
    err = capsys.readouterr().err
    assert f"job {job_id} {status}" in err
    if status == "failed":
        assert "calibration diverged" in err
    assert not json_out.exists()  # an error never becomes a baseline
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert status in error.get("message")


def test_gate_artifact_onnx(service, capsys, tmp_path):
    job_id = finished_job(service, WITH_ONNX, onnx=True)
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5") == 0
    capsys.readouterr()
    out = tmp_path / "onnx.json"
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--artifact", "onnx", "--json-out", out) == 1
    md = capsys.readouterr().out
    assert "| top-1 drop vs FP32 | 1.60 pts | ≤ 0.50 pts | ❌ FAIL |" in md
    assert "deployed ONNX model" in md
    report = json.loads(out.read_text())
    assert report["artifact"] == "onnx" and report["result"]["top1"] == 0.97
    # a job of another setting has no ONNX model: the gate cannot judge it, and says why
    other = finished_job(service, NO_ONNX)
    junit, json_out = tmp_path / "junit.xml", tmp_path / "none.json"
    assert run("gate", "--url", service.url, "--job", other, "--max-drop", "0.5",
               "--artifact", "onnx", "--junit", junit, "--json-out", json_out) == 2
    err = capsys.readouterr().err
    assert "no ONNX model to judge" in err and "this is 'full'" in err
    assert ET.parse(junit).getroot().find("testsuite").get("errors") == "1"
    assert not json_out.exists()
    with pytest.raises(SystemExit) as e:  # argparse: not a choice
        run("gate", "--url", service.url, "--job", other, "--max-drop", "0.5",
            "--artifact", "tflite")
    assert e.value.code == 2


def test_gate_result_without_accuracy_is_an_error(service, capsys):
    job_id = finished_job(service, {"kl": 0.1})
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5") == 2
    assert "top1" in capsys.readouterr().err


def test_gate_usage_errors(service, capsys, tmp_path):
    job_id = finished_job(service, PASSING)
    assert run("gate", "--url", service.url, "--job", job_id, "--model", "x",
               "--max-drop", "0.5") == 2
    assert "--job reads an existing job" in capsys.readouterr().err
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--baseline", tmp_path / "missing.json") == 2
    assert "cannot read baseline" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--baseline", bad) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"result": {"top1": 98.6}}))
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--baseline", bad) == 2
    assert "baseline" in capsys.readouterr().err
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "-1") == 2
    assert run("gate", "--url", service.url, "--max-drop", "nan") == 2
    assert "finite" in capsys.readouterr().err
    assert service.store.list_jobs()[1] == 1  # nothing submitted
    assert run("gate", "--url", service.url, "--job", job_id, "--max-drop", "0.5",
               "--junit", tmp_path) == 2  # a directory: cannot write
    assert "cannot write" in capsys.readouterr().err
