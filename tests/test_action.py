"""The GitHub Action (``action.yml``, a composite action) run the way the runner runs it, against a
real ``tsptq serve``: its inputs with their defaults, ``${{ inputs.* }}`` and
``${{ github.action_path }}`` substituted in each step's ``if``/``env``, each ``run`` script through
``bash --noprofile --norc -eo pipefail`` (the runner's ``shell: bash``), with
``GITHUB_STEP_SUMMARY`` and ``GITHUB_OUTPUT`` files. Exit 0 on a pass, 1 on a regression, 2 on a
service error; the summary appended, the JUnit written.

A composite action gets no ``INPUT_*`` variables (actions/runner#665; JavaScript and Docker
actions do, named ``INPUT_`` + the upper-cased name, hyphens kept: ``INPUT_MAX-DROP``, which bash
cannot even read): the action must take its inputs from ``env:``, and the test runs it without
any ``INPUT_*`` set, with a check that no script reads one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from procs import REPO, Proc, free_port, service_env, wait_healthy

pytestmark = pytest.mark.slow

ACTION = yaml.safe_load((REPO / "action.yml").read_text())
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
SPEC = {"data": {"calib_size": 8, "val_size": 32, "test_limit": 90},
        "artifacts": {"plots": False}}


def _value(expr: str, inputs: dict[str, str]) -> str:
    if expr.startswith("inputs."):
        return inputs[expr.removeprefix("inputs.")]  # KeyError: an input the action lacks
    if expr == "github.action_path":
        return str(REPO)
    raise AssertionError(f"an expression the test does not evaluate: {expr!r}")


def _substitute(text: str, inputs: dict[str, str]) -> str:
    return EXPR.sub(lambda m: _value(m.group(1), inputs), str(text))


def _condition(cond: str | None, inputs: dict[str, str]) -> bool:
    if cond is None:
        return True
    m = re.fullmatch(r"inputs\.([\w-]+) == '(.*)'", EXPR.sub(r"\1", cond).strip())
    assert m, f"a condition the test does not evaluate: {cond!r}"
    return inputs[m.group(1)] == m.group(2)


def run_action(given: dict[str, str], work: Path) -> tuple[int, str, dict[str, str]]:
    """The action's steps with inputs ``given``: (exit status, step summary, step outputs)."""
    declared = ACTION["inputs"]
    assert set(given) <= set(declared), set(given) - set(declared)
    missing = [k for k, v in declared.items() if v.get("required") and k not in given]
    assert not missing, f"required inputs missing: {missing}"
    inputs = {k: str(given.get(k, v.get("default", ""))) for k, v in declared.items()}
    work.mkdir(parents=True, exist_ok=True)
    summary, outputs = work / "step_summary.md", work / "github_output"
    summary.write_text("")  # the runner's file, appended to by every step
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TSPTQ_", "INPUT_", "GITHUB_"))}
    base.update({"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTION_PATH": str(REPO),
                 "GITHUB_WORKSPACE": str(work), "CI": "true"})
    code = 0
    for step in ACTION["runs"]["steps"]:
        if not _condition(step.get("if"), inputs):
            continue
        assert step["shell"] == "bash"
        env = {**base, **{k: _substitute(v, inputs) for k, v in step.get("env", {}).items()}}
        step_out = work / f"output-{step.get('id', 'step')}"
        step_out.write_text("")
        env["GITHUB_OUTPUT"] = str(step_out)
        script = work / "step.sh"
        script.write_text(_substitute(step["run"], inputs))
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        code = proc.returncode
        if step.get("id") == "gate":
            outputs.write_text(step_out.read_text())
        if code != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            break
    parsed = dict(line.split("=", 1) for line in outputs.read_text().splitlines()
                  if "=" in line) if outputs.exists() else {}
    return code, summary.read_text(), parsed


def test_the_action_reads_its_inputs_only_from_env():
    assert ACTION["runs"]["using"] == "composite"
    for step in ACTION["runs"]["steps"]:
        assert step["shell"] == "bash"
        assert "${{" not in step["run"], "an expression in run: is pasted into the script"
        assert "INPUT_" not in step["run"], "composite actions get no INPUT_* variables"
    used = {m.group(1).removeprefix("inputs.") for step in ACTION["runs"]["steps"]
            for v in step.get("env", {}).values() for m in EXPR.finditer(str(v))
            if m.group(1).startswith("inputs.")}
    used |= {m.group(1) for step in ACTION["runs"]["steps"]
             for m in re.finditer(r"inputs\.([\w-]+)", step.get("if", ""))}
    assert set(ACTION["inputs"]) == used, set(ACTION["inputs"]) ^ used  # each one used
    assert ACTION["inputs"]["max-drop"]["required"] is True
    for name in ("url", "token", "spec", "model", "w-bits", "a-bits", "max-drop", "baseline",
                 "max-regression"):
        assert name in ACTION["inputs"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("action")
    env = service_env(tmp, "unused", heartbeat_s=0.5, stale_after_s=30)
    del env["TSPTQ_DATABASE_URL"]  # the embedded default
    port = free_port()
    proc = Proc(["serve", "--port", str(port), "--log-level", "warning"], env, tmp / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.stop()


def _junit(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    return root if root.tag == "testsuite" else root.find("testsuite")


def test_pass_regression_and_service_error(server, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    common = {"install": "false", "tsptq": f"{sys.executable} -m service.cli", "url": server}

    # A pass: a W3A3 job (inputs override the spec file) may lose anything against FP32.
    code, summary, out = run_action({**common, "spec": str(spec), "model": "digits_vit",
                                     "w-bits": "3", "a-bits": "3", "max-drop": "100",
                                     "out-dir": "gate-pass"}, tmp_path / "pass")
    assert code == 0, summary
    assert out["exit-code"] == "0" and out["passed"] == "true"
    report = json.loads((tmp_path / "pass" / out["report"]).read_text())
    assert report["passed"] is True and report["request"]["quant"]["w_bits"] == 3
    assert report["request"]["data"]["test_limit"] == 90  # from the spec file
    job_id, top1 = report["job_id"], report["result"]["top1"]
    assert "## tsptq gate: ✅ passed" in summary and job_id in summary  # the gate's markdown
    suite = _junit(tmp_path / "pass" / out["junit"])
    assert suite.get("name") == "tsptq-gate" and suite.find("testcase") is not None
    assert suite.find(".//failure") is None

    # A regression: the same job against a baseline it cannot reach.
    assert top1 < 0.995, "a W3A3 digits ViT this good leaves no baseline above it"
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"top1": 1.0}))
    code, summary, out = run_action({**common, "job": job_id, "max-drop": "100",
                                     "baseline": str(baseline), "max-regression": "0.5",
                                     "out-dir": "gate-regressed"}, tmp_path / "regressed")
    assert code == 1, summary
    assert out["exit-code"] == "1" and out["passed"] == "false"
    assert "## tsptq gate: ❌ failed" in summary and "REGRESSION" in summary
    failures = _junit(tmp_path / "regressed" / out["junit"]).findall(".//failure")
    assert len(failures) == 1

    # A service error: nothing listens there.
    code, summary, out = run_action({**common, "url": f"http://127.0.0.1:{free_port()}",
                                     "max-drop": "0.5", "out-dir": "gate-error"},
                                    tmp_path / "error")
    assert code == 2, summary
    assert out["exit-code"] == "2" and "report" not in out  # no report: it cannot be a baseline
    assert summary.strip(), "the step summary says why"
    assert _junit(tmp_path / "error" / "gate-error" / "junit.xml").find(".//error") is not None
