"""The CI gate: does a quantized model keep its accuracy? Pure logic, no I/O.

``evaluate(GateInput(result, baseline, max_drop, max_regression))`` compares a finished job's
``result`` (the ``result`` of ``GET /jobs/{id}``: ``top1`` and ``fp32_top1`` as fractions in
[0, 1], plus ``agreement``, ``kl``, ``size_bytes``, ...) with two limits, both in percentage
points of top-1 accuracy:

* ``drop_vs_fp32``: ``(fp32_top1 - top1) * 100 <= max_drop``;
* ``regression_vs_baseline`` (only with a baseline): ``(baseline top1 - top1) * 100 <=
  max_regression``.

``artifact`` says whose accuracy is judged: ``"simulator"`` (the default) the job's ``result``
itself, the quantized model as simulated in PyTorch; ``"onnx"`` its ``result["onnx"]``, the
integer-setting job's ONNX model as measured in ONNX Runtime on the same test split, i.e. what
is deployed (``select_result``; a job without one cannot be judged: ``GateError``, exit 2).

A gain never fails a check. The ``GateReport`` renders as markdown (the CI summary), as JSON
and as JUnit XML (one testcase per check, a ``<failure>`` for each failed one).

Baseline file: the JSON that ``GateReport.to_json()`` writes (``tsptq gate --json-out``), so
the output of an accepted run can be committed as the next run's baseline::

    {
      "format": "tsptq-gate/1",
      "passed": true,
      "job_id": "3f2a...",
      "request": {"model": "digits_vit", ...},          # the job's request, if known
      "max_drop": 0.5, "max_regression": 0.5,
      "artifact": "simulator",                          # or "onnx"
      "result": {"top1": 0.9806, "fp32_top1": 0.9861, ...},   # the judged result, as is
      "baseline": {"top1": 0.9833, "job_id": "..."} | null,  # what this run was compared with
      "checks": [{"name": "drop_vs_fp32", "value": 0.55, "limit": 0.5, "passed": false,
                  "message": "..."}, ...],
      "notes": []
    }

Only ``result.top1`` is read from a baseline (``job_id`` and ``request`` are shown when present);
a bare job result (``{"top1": 0.98, ...}``) is accepted as a baseline too.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "tsptq-gate/1"
ARTIFACTS = ("simulator", "onnx")
# Float slack on the comparisons: a drop of exactly the limit passes, whatever the rounding.
EPS = 1e-9


class GateError(ValueError):
    """The gate cannot judge: a result or baseline without a usable ``top1``, a bad limit."""


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    message: str


@dataclass(frozen=True)
class GateInput:
    """What the gate judges. ``max_drop`` and ``max_regression`` are percentage points of
    top-1 (0.5 means half a point: 98.6% may fall to 98.1%)."""

    result: dict[str, Any]
    baseline: dict[str, Any] | None = None
    max_drop: float = 0.5
    max_regression: float = 0.5
    job_id: str | None = None
    request: dict[str, Any] | None = None
    artifact: str = "simulator"


@dataclass
class GateReport:
    passed: bool
    checks: list[Check]
    job_id: str | None = None
    request: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    max_drop: float = 0.5
    max_regression: float = 0.5
    notes: list[str] = field(default_factory=list)
    artifact: str = "simulator"

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "passed": self.passed, "job_id": self.job_id,
                "request": self.request, "max_drop": self.max_drop,
                "max_regression": self.max_regression, "artifact": self.artifact,
                "result": self.result,
                "baseline": self.baseline, "checks": [asdict(c) for c in self.checks],
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        head = "✅ passed" if self.passed else f"❌ failed ({len(self.failures)} check(s))"
        lines = [f"## tsptq gate: {head}", ""]
        what = [f"job `{self.job_id}`"] if self.job_id else []
        if self.request:
            what.append(describe_request(self.request))
        what.append(_ARTIFACT_TITLES.get(self.artifact, self.artifact))
        if what:
            lines += [" · ".join(what), ""]
        lines += ["| check | value | limit | result |", "| --- | --- | --- | --- |"]
        for c in self.checks:
            lines.append(f"| {_CHECK_TITLES.get(c.name, c.name)} | {c.value:.2f} pts | "
                         f"≤ {c.limit:.2f} pts | {'✅ pass' if c.passed else '❌ FAIL'} |")
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in _metric_rows(self.result, self.baseline)]
        details = [c.message for c in self.checks]
        lines += [""] + [f"- {m}" for m in details + self.notes]
        return "\n".join(lines) + "\n"

    def to_junit_xml(self) -> str:
        root, suite = _suite(len(self.checks), len(self.failures), 0)
        props = ET.SubElement(suite, "properties")
        for name, value in (("job_id", self.job_id), ("artifact", self.artifact),
                            ("max_drop", self.max_drop),
                            ("max_regression", self.max_regression),
                            ("top1", self.result.get("top1")),
                            ("fp32_top1", self.result.get("fp32_top1"))):
            if value is not None:
                ET.SubElement(props, "property", name=name, value=str(value))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname="tsptq.gate", name=c.name,
                                 time="0")
            if not c.passed:
                failure = ET.SubElement(case, "failure", message=c.message, type="regression")
                failure.text = f"value {c.value:.4f} pts > limit {c.limit:.4f} pts"
            else:
                ET.SubElement(case, "system-out").text = c.message
        return _xml(root)


_ARTIFACT_TITLES = {"simulator": "accuracy of the simulated model (PyTorch)",
                    "onnx": "accuracy of the deployed ONNX model (ONNX Runtime)"}
_CHECK_TITLES = {"drop_vs_fp32": "top-1 drop vs FP32",
                 "regression_vs_baseline": "top-1 regression vs baseline"}

def _suite(tests: int, failures: int, errors: int) -> tuple[ET.Element, ET.Element]:
    """``<testsuites>`` and its one ``<testsuite>``."""
    root = ET.Element("testsuites", name="tsptq", tests=str(tests), failures=str(failures),
                      errors=str(errors))
    suite = ET.SubElement(root, "testsuite", name="tsptq-gate", tests=str(tests),
                          failures=str(failures), errors=str(errors), skipped="0", time="0")
    return root, suite


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _fraction(d: dict[str, Any] | None, key: str, what: str) -> float:
    value = d.get(key) if isinstance(d, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value <= 1.0):
        raise GateError(f"{what} has no usable {key!r} (a fraction in [0, 1]): got {value!r}")
    return float(value)


def _limit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise GateError(f"{name} must be a finite number of percentage points >= 0, "
                        f"got {value!r}")
    return float(value)


def baseline_top1(baseline: dict[str, Any]) -> float:
    """The top-1 a baseline file holds: ``result.top1`` of a gate report, or ``top1`` of a bare
    job result."""
    if not isinstance(baseline, dict):
        raise GateError(f"the baseline must be a JSON object, got {type(baseline).__name__}")
    if "result" in baseline:
        return _fraction(baseline["result"], "top1", "the baseline's result")
    return _fraction(baseline, "top1", "the baseline")


def select_result(result: dict[str, Any], artifact: str = "simulator") -> dict[str, Any]:
    """The metrics the gate judges for ``artifact``: the job's result (``"simulator"``) or its
    ONNX Runtime metrics ``result["onnx"]`` (``"onnx"``); ``GateError`` when the job has none,
    with the job's own reason when it gave one (a job of another setting than "integer")."""
    if artifact not in ARTIFACTS:
        raise GateError(f"unknown artifact {artifact!r}; choose from {ARTIFACTS}")
    if artifact == "simulator":
        return result
    onnx = result.get("onnx") if isinstance(result, dict) else None
    if not isinstance(onnx, dict):
        raise GateError("the job has no ONNX Runtime accuracy (result.onnx): it was run before "
                        "jobs measured their ONNX model; rerun it in the integer setting")
    if onnx.get("available") is False:
        raise GateError(f"the job has no ONNX model to judge: "
                        f"{onnx.get('reason') or 'no reason given'}")
    return onnx


def evaluate(inp: GateInput) -> GateReport:
    """Judge ``inp``; ``GateError`` if it cannot be judged (see the module docstring)."""
    max_drop = _limit(inp.max_drop, "max_drop")
    max_regression = _limit(inp.max_regression, "max_regression")
    result = select_result(inp.result, inp.artifact)
    what = "the job's result" if inp.artifact == "simulator" else "the job's ONNX result"
    top1 = _fraction(result, "top1", what)
    fp32 = _fraction(result, "fp32_top1", what)
    checks = []
    drop = (fp32 - top1) * 100
    ok = drop <= max_drop + EPS
    checks.append(Check(
        "drop_vs_fp32", round(drop, 6), max_drop, ok,
        f"top-1 {top1:.2%} vs FP32 {fp32:.2%}: {_change(drop)}, allowed drop "
        f"{max_drop:.2f} pts{'' if ok else ' — REGRESSION'}"))
    baseline_info = None
    notes: list[str] = []
    if inp.baseline is not None:
        base = baseline_top1(inp.baseline)
        base_job = inp.baseline.get("job_id") if isinstance(inp.baseline, dict) else None
        baseline_info = {"top1": base, "job_id": base_job}
        regression = (base - top1) * 100
        ok = regression <= max_regression + EPS
        checks.append(Check(
            "regression_vs_baseline", round(regression, 6), max_regression, ok,
            f"top-1 {top1:.2%} vs baseline {base:.2%}"
            f"{f' (job {base_job})' if base_job else ''}: {_change(regression)}, allowed "
            f"regression {max_regression:.2f} pts{'' if ok else ' — REGRESSION'}"))
        base_request = inp.baseline.get("request")
        if base_request and inp.request and base_request != inp.request:
            notes.append("the baseline was made from a different request: "
                         f"{describe_request(base_request)}")
    else:
        notes.append("no baseline given: only the drop vs FP32 was checked")
    return GateReport(passed=all(c.passed for c in checks), checks=checks, job_id=inp.job_id,
                      request=inp.request, result=dict(result), baseline=baseline_info,
                      max_drop=max_drop, max_regression=max_regression, notes=notes,
                      artifact=inp.artifact)


def _change(points_lost: float) -> str:
    if points_lost > 0:
        return f"{points_lost:.2f} pts lower"
    if points_lost < 0:
        return f"{-points_lost:.2f} pts higher"
    return "unchanged"


def _metric_rows(result: dict[str, Any], baseline: dict[str, Any] | None) -> list[tuple]:
    rows: list[tuple[str, str]] = []

    def pct(key: str, title: str) -> None:
        v = result.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append((title, f"{v:.2%}"))

    pct("top1", "top-1 (quantized)")
    pct("fp32_top1", "top-1 (FP32)")
    if baseline is not None:
        rows.append(("top-1 (baseline)", f"{baseline['top1']:.2%}"))
    pct("agreement", "top-1 agreement with FP32")
    kl = result.get("kl")
    if isinstance(kl, (int, float)) and not isinstance(kl, bool):
        rows.append(("KL(FP32 ‖ quantized)", f"{kl:.3g}"))
    size, fp32_size = result.get("size_bytes"), result.get("fp32_size_bytes")
    if isinstance(size, int) and not isinstance(size, bool):
        text = human_bytes(size)
        if isinstance(fp32_size, int) and size > 0:
            text += f" (FP32 {human_bytes(fp32_size)}, {fp32_size / size:.1f}× smaller)"
        rows.append(("checkpoint size", text))
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_request(request: dict[str, Any]) -> str:
    """One line for a job request: ``digits_vit (pretrained) · tsptq full W8A8 · search none``."""
    if not isinstance(request, dict):
        return str(request)
    quant = request.get("quant") or {}
    search = request.get("search") or {}
    data = (request.get("data") or {}).get("source", "digits")
    return (f"{request.get('model', '?')} ({request.get('weights', 'pretrained')}) on {data} · "
            f"{quant.get('method', 'tsptq')} {quant.get('setting', 'full')} "
            f"W{quant.get('w_bits', 8)}A{quant.get('a_bits', 8)} · "
            f"search {search.get('strategy', 'none')}")


def error_markdown(message: str, job_id: str | None = None) -> str:
    """The summary of a run the gate could not judge (exit code 2)."""
    job = f" (job `{job_id}`)" if job_id else ""
    return f"## tsptq gate: ⚠️ error{job}\n\n{message}\n"


def error_junit_xml(message: str, job_id: str | None = None) -> str:
    """JUnit XML for a run the gate could not judge: one testcase with an ``<error>``."""
    root, suite = _suite(1, 0, 1)
    if job_id:
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="job_id",
                      value=job_id)
    case = ET.SubElement(suite, "testcase", classname="tsptq.gate", name="gate", time="0")
    ET.SubElement(case, "error", message=message, type="error").text = message
    return _xml(root)
