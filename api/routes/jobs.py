"""Jobs: submit, list, inspect, cancel; their search candidates and artifacts.

Routes are plain functions (FastAPI runs them in its thread pool): the store is synchronous.
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import TypeAdapter

from api.cache import FINAL, BodyCache
from api.deps import SettingsDep, StoreDep
from api.errors import responses
from api.schemas import ArtifactOut, CandidateOut, JobOut, JobPage, JobStatus
from quant.modules import UnsupportedModelError
from quant.zoo.models import check_supported
from service.jobspec import DIGITS, DataPathError, JobSpec, resolve_data_dir
from service.models import Job
from service.store import Store

router = APIRouter(prefix="/jobs", tags=["jobs"])

ID = re.compile(r"^[0-9a-f]{32}$")
MAX_OFFSET = 2**31 - 1
RUNNING = ("queued", "running")
_CANDIDATES = TypeAdapter(list[CandidateOut])
# A finished job's candidates, serialized once: the dashboard's job page loads them (500 rows
# take ~20 ms through the response model, ~8 ms of it decoding their JSON from the database).
_candidate_bodies = BodyCache()


def _job_or_404(store: Store, job_id: str) -> Job:
    # Ids are uuid4 hex: anything else is unknown without asking the database.
    job = store.get_job(job_id) if ID.match(job_id) else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


@functools.lru_cache(maxsize=512)
def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be quantized, or None. Cached: building even a model on the meta
    device takes ~80 ms of CPU (and the GIL), too much to repeat on every request, and the
    answer for a name does not change while the process runs."""
    try:
        check_supported(name)
    except (ValueError, UnsupportedModelError) as e:
        return str(e)
    except Exception as e:  # a timm model that cannot even be built: refuse it all the same
        return f"model {name!r} cannot be built: {type(e).__name__}: {str(e)[:300]}"
    return None


_model_check = threading.Lock()


def _check_model(spec: JobSpec) -> None:
    with _model_check:  # concurrent first requests for a name wait for one check, not build N
        problem = model_problem(spec.model)
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)


def _check_data(source: str, roots: list[Path]) -> None:
    try:
        resolve_data_dir(source, roots)
    except DataPathError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"data.source: {e}") from None
    except (ValueError, OSError) as e:  # a path the OS refuses: NUL byte, too long, ...
        shown = repr(source) if len(source) <= 80 else f"{source[:80]!r}..."
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"data.source {shown} is not a usable path: {reason}") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=responses(400, 413, 422, 503),
             summary="Submit a quantization job")
def submit_job(spec: JobSpec, response: Response, store: StoreDep,
               settings: SettingsDep) -> JobOut:
    """Validate ``spec`` (schema, then: the model is a timm model the library can quantize,
    an uploaded model named in ``weights`` exists, the data directory lies under a data root)
    and queue it. ``{}`` is a complete request: the bundled digits ViT at TSPTQ W8A8.

    Answers 202 with ``Location: /jobs/{id}``; poll that URL for progress and the result."""
    _check_model(spec)
    model_id = spec.uploaded_model_id
    if model_id is not None and store.get_model(model_id) is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"weights: no uploaded model {model_id} (upload with POST /models)")
    if spec.data.source != DIGITS:
        _check_data(spec.data.source, settings.data_roots)
    job = store.create_job(spec.model_dump(mode="json"))
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobOut.from_job(job)


@router.get("", response_model=JobPage, responses=responses(422, 503), summary="List jobs")
def list_jobs(
    store: StoreDep,
    status_: Annotated[JobStatus | None, Query(alias="status",
                                               description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    """Jobs, newest first, one page at a time; ``total`` counts every matching job."""
    jobs, total = store.list_jobs(status_, limit=limit, offset=offset)
    return JobPage(items=[JobOut.from_job(j) for j in jobs], total=total, limit=limit,
                   offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=responses(404, 422, 503),
            summary="A job: status, progress, error, result, timings")
def get_job(job_id: str, store: StoreDep) -> JobOut:
    return JobOut.from_job(_job_or_404(store, job_id))


@router.delete(
    "/{job_id}", response_model=JobOut, response_description="The queued job, now cancelled",
    responses={
        **responses(404, 409, 422, 503),
        202: {"model": JobOut,
              "description": "The job is running: cancellation requested (cancel_requested is "
                             "true); its dispatcher stops the work and marks it cancelled"},
    },
    summary="Cancel a job")
def cancel_job(job_id: str, response: Response, store: StoreDep) -> JobOut:
    """A queued job is cancelled at once (200); a running one is flagged and stopped by its
    dispatcher (202); a finished one answers 409."""
    before = _job_or_404(store, job_id)
    after = store.request_cancel(job_id)
    if after is None:  # deleted meanwhile
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    if after.status == "cancelled" and before.status != "cancelled":
        return JobOut.from_job(after)
    if after.status == "running" and after.cancel_requested:
        response.status_code = status.HTTP_202_ACCEPTED
        return JobOut.from_job(after)
    raise HTTPException(status.HTTP_409_CONFLICT,
                        f"job {job_id} is already {after.status}: nothing to cancel")


@router.get("/{job_id}/candidates", response_model=list[CandidateOut],
            responses=responses(404, 422, 503), summary="A job's search candidates")
def list_candidates(job_id: str, store: StoreDep) -> Response:
    """Every evaluated candidate, in search order (``seq``)."""
    job = _job_or_404(store, job_id)

    def body() -> bytes:
        return _CANDIDATES.dump_json([CandidateOut.from_candidate(c)
                                      for c in store.candidates(job_id)])

    if job.status in FINAL:
        key = f"{job_id}:{store.candidate_count(job_id)}"
        return Response(_candidate_bodies.get(key, body), media_type="application/json")
    return Response(body(), media_type="application/json")


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut],
            responses=responses(404, 409, 422, 503), summary="A job's artifacts")
def list_artifacts(job_id: str, store: StoreDep) -> list[ArtifactOut]:
    """The quantized checkpoint, the report and the plots of a finished job (a failed or
    cancelled job may have none); 409 while it is queued or running."""
    job = _job_or_404(store, job_id)
    if job.status in RUNNING:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"job {job_id} is {job.status}: artifacts are written when the job "
                            "succeeds")
    return [ArtifactOut.from_artifact(a) for a in store.artifacts(job_id)]
