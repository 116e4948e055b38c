"""The client side of the ``tsptq`` command line: talk to a running service.

    tsptq submit [spec flags] [--spec FILE.json] [--wait]      queue a job, print its id
    tsptq status [JOB_ID] [--json]                             one job, or the recent ones
    tsptq cancel JOB_ID                                        cancel a queued/running job
    tsptq download JOB_ID [--kind checkpoint|report|plot|onnx|all] [--out DIR]
    tsptq gate (--job JOB_ID | [spec flags] [--spec FILE]) --max-drop PTS
               [--artifact simulator|onnx] [--baseline FILE] [--max-regression PTS]
               [--json-out PATH] [--junit PATH] [--summary PATH]

Spec flags: --model, --weights (pretrained, random, model:{id}, or a local .safetensors file,
uploaded first), --data, --method, --setting, --w-bits, --a-bits, --strategy, --budget-bits,
--max-candidates, --time-budget, --target-agreement; they override the ``--spec`` file.

Every command takes ``--url`` (default ``$TSPTQ_URL`` or http://127.0.0.1:8000) and
``--token`` (default ``$TSPTQ_API_TOKEN``; prefer the variable, a flag shows in ``ps``).

Exit codes: 0 success; 1 a negative outcome (``submit --wait``: the job failed or was
cancelled; ``cancel``: the job had already finished; ``gate``: a regression); 2 a usage or
service error (bad flags or files, service unreachable, unknown job, ``gate`` on a job that
failed or was cancelled, ``gate --artifact onnx`` on a job without an ONNX model); 130
interrupted (the job goes on running on the service).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from service.client import FINISHED, ServiceClient, ServiceError
from service.gate import (
    ARTIFACTS,
    GateError,
    GateInput,
    baseline_top1,
    describe_request,
    error_junit_xml,
    error_markdown,
    evaluate,
    human_bytes,
)
from service.jobspec import MODEL_REF, JobSpec, QuantSpec, SearchSpec

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ARTIFACT_KINDS = ("checkpoint", "report", "plot", "onnx")


class UsageError(Exception):
    """A problem with the command line or the files it names (exit 2)."""


def _err(message: str) -> None:
    print(f"tsptq: {message}", file=sys.stderr)


def _choices(model: type, name: str) -> tuple[str, ...]:
    return get_args(model.model_fields[name].annotation)


# -- shared options ----------------------------------------------------------------------------


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("service")
    g.add_argument("--url", help="service URL (default: $TSPTQ_URL or http://127.0.0.1:8000)")
    g.add_argument("--token", help="API token (default: $TSPTQ_API_TOKEN)")
    g.add_argument("--http-timeout", type=float, default=30, metavar="S",
                   help="seconds per HTTP request (default: 30)")
    return p


def _spec_parent() -> argparse.ArgumentParser:
    """The job spec flags: every default is None, so only the flags given override --spec."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("job spec (flags override --spec; unset fields take the "
                             "service's defaults)")
    g.add_argument("--spec", type=Path, metavar="FILE.json", help="a full JobSpec as JSON")
    g.add_argument("--model", help="timm model name (default: digits_vit)")
    g.add_argument("--weights", help="pretrained (default), random, model:{id} (an upload), "
                                     "or a local .safetensors file to upload first")
    g.add_argument("--data", help="digits (default) or an ImageFolder dir under a server "
                                  "data root")
    g.add_argument("--method", choices=_choices(QuantSpec, "method"), help="(default: tsptq)")
    g.add_argument("--setting", choices=_choices(QuantSpec, "setting"), help="(default: full)")
    g.add_argument("--w-bits", type=int, help="weight bits (default: 8)")
    g.add_argument("--a-bits", type=int, help="activation bits (default: 8)")
    g.add_argument("--strategy", choices=_choices(SearchSpec, "strategy"),
                   help="bit-width/parameter search (default: none)")
    g.add_argument("--budget-bits", type=float, metavar="F",
                   help="mean weight and activation bits at most (greedy needs it)")
    g.add_argument("--max-candidates", type=int, metavar="N")
    g.add_argument("--time-budget", type=float, metavar="S", help="search seconds at most")
    g.add_argument("--target-agreement", type=float, metavar="F",
                   help="stop once a candidate agrees with FP32 on this share of images")
    w = p.add_argument_group("waiting")
    w.add_argument("--poll", type=float, default=1.0, metavar="S",
                   help="seconds between polls (default: 1)")
    w.add_argument("--wait-timeout", type=float, metavar="S",
                   help="give up waiting after S seconds (the job goes on)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _client(args: argparse.Namespace) -> ServiceClient:
    try:
        return ServiceClient(args.url, args.token, timeout=args.http_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from None


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSpec dict: the ``--spec`` file (or ``{}``) with the flags given laid over it,
    validated here so that mistakes are reported before anything is sent."""
    spec: dict[str, Any] = {}
    if args.spec is not None:
        spec = _read_json(args.spec, "spec file")
        if not isinstance(spec, dict):
            raise UsageError(f"spec file {args.spec} must hold a JSON object")
    for key, value in (("model", args.model), ("weights", args.weights)):
        if value is not None:
            spec[key] = value
    sections: dict[str, dict[str, Any]] = {
        "data": {"source": args.data},
        "quant": {"method": args.method, "setting": args.setting, "w_bits": args.w_bits,
                  "a_bits": args.a_bits},
        "search": {"strategy": args.strategy, "budget_weight_bits": args.budget_bits,
                   "budget_activation_bits": args.budget_bits,
                   "max_candidates": args.max_candidates, "time_budget_s": args.time_budget,
                   "target_agreement": args.target_agreement},
    }
    for section, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            current = spec.get(section, {})
            if not isinstance(current, dict):
                raise UsageError(f"spec: {section!r} must be an object")
            spec[section] = {**current, **given}
    local_weights = _local_weights(spec.get("weights"))
    check = dict(spec, weights="random") if local_weights else spec
    try:
        JobSpec.model_validate(check)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'spec'}: {err['msg']}"
                             for err in e.errors())
        raise UsageError(f"invalid job spec: {problems}") from None
    return spec


def _local_weights(weights: Any) -> Path | None:
    """A ``weights`` value naming a local file (to upload), else None."""
    if not isinstance(weights, str) or weights in ("pretrained", "random"):
        return None
    if MODEL_REF.match(weights):
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UsageError(f"weights {weights!r} is neither pretrained, random, model:{{id}} nor "
                         "a readable file")
    return path


def _submit(client: ServiceClient, spec: dict[str, Any]) -> dict[str, Any]:
    path = _local_weights(spec.get("weights"))
    if path is not None:
        uploaded = client.upload_model(path)
        print(f"uploaded {path} as {uploaded['weights']}", file=sys.stderr)
        spec = dict(spec, weights=uploaded["weights"])
    return client.submit(spec)


class _Progress:
    """A tqdm bar on stderr fed by each poll's ``progress.done/total`` and ``stage``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        progress = job.get("progress") or {}
        done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
        desc = progress.get("stage") or job.get("status", "")
        if self.bar is None:
            self.bar = tqdm(total=total or None, desc=desc, unit="cand", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.set_description_str(desc, refresh=False)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _wait(client: ServiceClient, job_id: str, args: argparse.Namespace) -> dict[str, Any]:
    progress = _Progress(not args.no_progress)
    try:
        return client.wait(job_id, poll_s=args.poll, timeout_s=args.wait_timeout,
                           on_progress=progress)
    finally:
        progress.close()


def _handle(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command: service and usage errors become a message on stderr and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (UsageError, ServiceError, GateError) as e:
            _err(str(e))
            return EXIT_USAGE
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


# -- submit -------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    with _client(args) as client:
        job = _submit(client, spec)
        print(job["id"])
        if not args.wait:
            return EXIT_OK
        try:
            job = _wait(client, job["id"], args)
        except KeyboardInterrupt:
            _err(f"stopped waiting; job {job['id']} goes on (tsptq cancel {job['id']})")
            return EXIT_INTERRUPTED
    print(format_job(job))
    return EXIT_OK if job["status"] == "succeeded" else EXIT_NEGATIVE


# -- status / cancel ----------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "-"


def _when(value: Any) -> str:
    return str(value).replace("T", " ")[:19] if value else "-"


def format_result(result: dict[str, Any]) -> str:
    parts = [f"top-1 {_pct(result.get('top1'))}"]
    top1, fp32 = result.get("top1"), result.get("fp32_top1")
    if isinstance(fp32, (int, float)):
        drop = f", drop {(fp32 - top1) * 100:.2f} pts" if isinstance(top1, (int, float)) else ""
        parts[0] += f" (FP32 {_pct(fp32)}{drop})"
    if result.get("agreement") is not None:
        parts.append(f"agreement {_pct(result['agreement'])}")
    if isinstance(result.get("kl"), (int, float)):
        parts.append(f"KL {result['kl']:.3g}")
    size, fp32_size = result.get("size_bytes"), result.get("fp32_size_bytes")
    if isinstance(size, int) and size > 0:
        text = f"size {human_bytes(size)}"
        if isinstance(fp32_size, int):
            text += f" (FP32 {human_bytes(fp32_size)}, {fp32_size / size:.1f}x smaller)"
        parts.append(text)
    return " · ".join(parts)


def format_job(job: dict[str, Any]) -> str:
    """A readable multi-line summary of one job."""
    progress = job.get("progress") or {}
    lines = [f"job {job.get('id')}: {job.get('status')}"
             + (" (cancel requested)" if job.get("cancel_requested")
                and job.get("status") not in FINISHED else "")]
    if job.get("request"):
        lines.append(f"  request:  {describe_request(job['request'])}")
    done, total = progress.get("done", 0), progress.get("total", 0)
    stage = f" ({progress['stage']})" if progress.get("stage") else ""
    lines.append(f"  progress: {done}/{total}{stage}")
    lines.append(f"  created {_when(job.get('created_at'))} · started "
                 f"{_when(job.get('started_at'))} · finished {_when(job.get('finished_at'))}")
    if job.get("result"):
        lines.append(f"  result:   {format_result(job['result'])}")
    timings = job.get("timings") or {}
    if timings:
        shown = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s"
                          if isinstance(v, (int, float)) else f"{k} {v}"
                          for k, v in timings.items())
        lines.append(f"  timings:  {shown}")
    if job.get("error"):
        lines.append(f"  error:    {job['error']}")
    return "\n".join(lines)


def format_jobs(page: dict[str, Any]) -> str:
    items = page.get("items") or []
    if not items:
        return "no jobs"
    lines = [f"{'id':32}  {'status':9}  {'progress':>9}  {'created':19}  {'model':16}  "
             f"{'W/A':5}  {'top-1':>7}"]
    for job in items:
        req = job.get("request") or {}
        quant = req.get("quant") or {}
        progress = job.get("progress") or {}
        wa = f"{quant.get('w_bits', 8)}/{quant.get('a_bits', 8)}"
        prog = f"{progress.get('done', 0)}/{progress.get('total', 0)}"
        top1 = _pct((job.get("result") or {}).get("top1"))
        lines.append(f"{job.get('id', ''):32}  {job.get('status', ''):9}  {prog:>9}  "
                     f"{_when(job.get('created_at')):19}  {str(req.get('model', '?'))[:16]:16}  "
                     f"{wa:5}  {top1:>7}")
    shown = page.get("offset", 0) + len(items)
    lines.append(f"({len(items)} shown of {page.get('total', len(items))}"
                 + (f"; --offset {shown} for more" if shown < page.get("total", 0) else "")
                 + ")")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.job_id:
            job = client.job(args.job_id)
            print(json.dumps(job, indent=2) if args.json else format_job(job))
        else:
            page = client.jobs(status=args.status, limit=args.limit, offset=args.offset)
            print(json.dumps(page, indent=2) if args.json else format_jobs(page))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            job = client.cancel(args.job_id)
        except ServiceError as e:
            if e.status == 409:
                _err(f"job {args.job_id}: {e.message}")
                return EXIT_NEGATIVE
            raise
    if job.get("status") == "cancelled":
        print(f"job {args.job_id} cancelled")
    else:
        print(f"cancel requested for job {args.job_id} (now {job.get('status')}; it stops at "
              "its next candidate)")
    return EXIT_OK


# -- download -----------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        artifacts = client.artifacts(args.job_id)
        chosen = [a for a in artifacts if args.kind == "all" or a.get("kind") == args.kind]
        if not chosen:
            kinds = sorted({str(a.get("kind")) for a in artifacts}) or ["none"]
            raise UsageError(f"job {args.job_id} has no {args.kind} artifact (it has: "
                             f"{', '.join(kinds)})")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {args.out}: {e.strerror or e}") from None
        for artifact in chosen:
            path = client.download(artifact, args.out)
            # sha256sum's format: `sha256sum -c` checks the files again.
            print(f"{artifact['sha256']}  {path}")
    return EXIT_OK


# -- gate ---------------------------------------------------------------------------------------

SPEC_FLAGS = ("spec", "model", "weights", "data", "method", "setting", "w_bits", "a_bits",
              "strategy", "budget_bits", "max_candidates", "time_budget", "target_agreement")


def _write(path: Path | None, text: str, *, append: bool = False) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if append else "w", encoding="utf-8") as f:
            f.write(text if not append else "\n" + text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _step_summary() -> Path | None:
    value = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(value) if value else None


def cmd_gate(args: argparse.Namespace) -> int:
    given = [f for f in SPEC_FLAGS if getattr(args, f) is not None]
    if args.job and given:
        raise UsageError("--job reads an existing job: leave out --spec and the spec flags ("
                         + ", ".join("--" + f.replace("_", "-") for f in given) + ")")
    baseline = None
    if args.baseline is not None:
        baseline = _read_json(args.baseline, "baseline")
        try:
            baseline_top1(baseline)
        except GateError as e:
            raise UsageError(f"baseline {args.baseline}: {e}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (args.max_drop, args.max_regression)):
        # checked before a job is spent on it
        raise UsageError("--max-drop and --max-regression must be finite numbers >= 0 "
                         "(percentage points)")
    spec = None if args.job else build_spec(args)
    job_id = args.job
    try:
        with _client(args) as client:
            if job_id is None:
                job = _submit(client, spec)
                job_id = job["id"]
                print(f"submitted job {job_id}", file=sys.stderr)
            else:
                job = client.job(job_id)
            if job.get("status") not in FINISHED:
                job = _wait(client, job_id, args)
        if job["status"] != "succeeded":
            why = f": {job['error']}" if job.get("error") else ""
            raise ServiceError(None, f"job {job_id} {job['status']}{why}")
        report = evaluate(GateInput(result=job.get("result") or {}, baseline=baseline,
                                    max_drop=args.max_drop,
                                    max_regression=args.max_regression, job_id=job_id,
                                    request=job.get("request"), artifact=args.artifact))
    except (ServiceError, GateError) as e:
        _write_error(args, str(e), job_id)
        raise
    except KeyboardInterrupt:
        if job_id:
            _err(f"stopped waiting; job {job_id} goes on (tsptq cancel {job_id})")
        raise
    markdown = report.to_markdown()
    _write(args.json_out, report.to_json())
    _write(args.junit, report.to_junit_xml())
    _write(args.summary, markdown)
    _write(_step_summary(), markdown, append=True)
    print(markdown, end="")
    return EXIT_OK if report.passed else EXIT_NEGATIVE


def _write_error(args: argparse.Namespace, message: str, job_id: str | None) -> None:
    """An unjudgeable run still leaves a summary and JUnit XML (never a --json-out: it must not
    become a baseline)."""
    try:
        markdown = error_markdown(message, job_id)
        _write(args.junit, error_junit_xml(message, job_id))
        _write(args.summary, markdown)
        _write(_step_summary(), markdown, append=True)
    except UsageError as e:
        _err(str(e))


# -- registration -------------------------------------------------------------------------------

SUBMIT_HELP = """\
Queue a job and print its id. With --wait, follow it to the end (a progress
bar on stderr), then print its status and result: exit 0 if it succeeded,
1 if it failed or was cancelled."""

GATE_HELP = """\
Judge a job (--job), or submit one from the spec flags and wait for it; then
compare its top-1 with FP32 (--max-drop) and with a baseline (--baseline,
--max-regression), both in percentage points. --artifact onnx judges the
accuracy of what is deployed: the job's ONNX model as measured in ONNX
Runtime (integer-setting jobs only); the default, simulator, judges the
simulated model's.

exit codes:
  0  passed
  1  a regression beyond an allowed limit
  2  usage or service error (service unreachable, unknown job, job failed or
     cancelled, unreadable files, --artifact onnx on a job without an ONNX
     model)

The markdown summary goes to stdout, --summary and $GITHUB_STEP_SUMMARY.
--json-out writes the report; that file is what --baseline reads, so an
accepted run's report can be committed as the next baseline. See docs/ci.md."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``status``, ``cancel``, ``download`` and ``gate`` to ``sub``."""
    conn, spec = _connection_parent(), _spec_parent()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("submit", parents=[spec, conn], formatter_class=fmt,
                       help="queue a quantization job on the service",
                       description=SUBMIT_HELP)
    p.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    p.set_defaults(func=_handle(cmd_submit))

    p = sub.add_parser("status", parents=[conn], help="show a job, or list recent jobs",
                       description="Show one job (JOB_ID), or list the recent jobs.")
    p.add_argument("job_id", nargs="?", metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    p.add_argument("--status", choices=("queued", "running", "succeeded", "failed",
                                        "cancelled"), help="list only jobs in this status")
    p.add_argument("--limit", type=int, default=20, help="jobs to list (default: 20)")
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=_handle(cmd_status))

    p = sub.add_parser("cancel", parents=[conn], help="cancel a queued or running job",
                       description="Cancel a job: exit 1 if it had already finished.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=_handle(cmd_cancel))

    p = sub.add_parser("download", parents=[conn], help="download a finished job's artifacts",
                       description="Download artifacts (verified size and sha256) and print "
                                   "`sha256  path` for each, as sha256sum does.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--kind", choices=(*ARTIFACT_KINDS, "all"), default="checkpoint",
                   help="which artifacts (default: checkpoint)")
    p.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                   help="directory to write into (default: ./out)")
    p.set_defaults(func=_handle(cmd_download))

    p = sub.add_parser(
        "gate", parents=[spec, conn], formatter_class=fmt,
        help="CI gate: fail on an accuracy drop vs FP32 or a regression vs a baseline",
        description=GATE_HELP)
    p.add_argument("--job", metavar="JOB_ID", help="judge this job (waits if unfinished)")
    p.add_argument("--max-drop", type=float, required=True, metavar="PTS",
                   help="allowed top-1 drop vs FP32, percentage points (e.g. 0.5)")
    p.add_argument("--artifact", choices=ARTIFACTS, default="simulator",
                   help="whose accuracy: the simulated model's (default) or the deployed ONNX "
                        "model's, as measured in ONNX Runtime")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="an earlier --json-out report (or a job result) to compare with")
    p.add_argument("--max-regression", type=float, default=0.5, metavar="PTS",
                   help="allowed top-1 drop vs the baseline, percentage points (default: 0.5)")
    p.add_argument("--json-out", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML")
    p.add_argument("--summary", type=Path, metavar="PATH", help="write the markdown summary")
    p.set_defaults(func=_handle(cmd_gate))
