"""Response bodies of the API (requests are ``service.jobspec.JobSpec`` and raw uploads).

Every route declares its response model and its error responses with these, so the OpenAPI
schema describes every answer the service gives. ``from_*`` helpers turn the store's detached
ORM objects into response models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from service.models import ARTIFACT_KINDS, JOB_STATUSES, Artifact, Candidate, Job, UploadedModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ArtifactKind = Literal["checkpoint", "report", "plot", "onnx"]
# The literals above are what the OpenAPI schema shows: keep them equal to the database's.
assert get_args(JobStatus) == JOB_STATUSES, "JobStatus out of step with service.models"
assert get_args(ArtifactKind) == ARTIFACT_KINDS, "ArtifactKind out of step with service.models"


class ErrorOut(BaseModel):
    """Every error that is not a request validation error."""

    detail: str = Field(description="what went wrong, for a person to read")


class ValidationIssue(BaseModel):
    """One problem with a request, as FastAPI (pydantic) reports it."""

    loc: list[str | int] = Field(description="where: body/query/path and the field path")
    msg: str
    type: str
    input: Any = Field(None, description="the offending value (strings for non-JSON values)")
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    """422: the request is well formed but not acceptable. ``detail`` is FastAPI's list of
    issues when the request does not match its schema, or a sentence when a check beyond the
    schema failed (unknown or unsupported model, missing upload, bad data path, bad file)."""

    detail: str | list[ValidationIssue]


class Progress(BaseModel):
    done: int = Field(description="candidates evaluated so far")
    total: int = Field(description="candidates planned (0 while unknown)")
    stage: str | None = Field(None, description="what the job is doing now")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    request: dict[str, Any] = Field(description="the accepted JobSpec, defaults filled in")
    progress: Progress
    cancel_requested: bool
    error: str | None = None
    result: dict[str, Any] | None = Field(
        None, description="the best candidate's metrics once the job succeeded")
    timings: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    claims: int = Field(description="how many dispatchers claimed the job and did not hand it "
                        "back in order (a stop); at TSPTQ_MAX_ATTEMPTS stale claims it is failed")

    @classmethod
    def from_job(cls, job: Job) -> JobOut:
        return cls(
            id=job.id, status=job.status, request=job.request,  # type: ignore[arg-type]
            progress=Progress(done=job.progress_done, total=job.progress_total,
                              stage=job.stage),
            cancel_requested=job.cancel_requested, error=job.error, result=job.result,
            timings=job.timings, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, claims=job.claims)


class JobPage(BaseModel):
    items: list[JobOut]
    total: int = Field(description="jobs matching the filter, over all pages")
    limit: int
    offset: int


class CandidateOut(BaseModel):
    seq: int = Field(description="order in which the search proposed it")
    key: str
    spec: dict[str, Any]
    kl: float
    agreement: float
    costs: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_candidate(cls, c: Candidate) -> CandidateOut:
        return cls(seq=c.seq, key=c.key, spec=c.spec, kl=c.kl, agreement=c.agreement,
                   costs=c.costs, created_at=c.created_at)


class ArtifactOut(BaseModel):
    id: str
    kind: ArtifactKind
    name: str
    size: int = Field(description="bytes")
    sha256: str = Field(description="hex digest of the content")
    media_type: str
    created_at: datetime
    url: str = Field(description="where to download it (GET)")

    @classmethod
    def from_artifact(cls, a: Artifact) -> ArtifactOut:
        return cls(id=a.id, kind=a.kind, name=a.name, size=a.size,  # type: ignore[arg-type]
                   sha256=a.sha256, media_type=a.media_type, created_at=a.created_at,
                   url=f"/artifacts/{a.id}")


class ModelOut(BaseModel):
    id: str
    name: str
    size: int = Field(description="bytes")
    sha256: str = Field(description="hex digest of the file")
    created_at: datetime
    weights: str = Field(description='put this in a job request: {"weights": "model:{id}"}')

    @classmethod
    def from_model(cls, m: UploadedModel) -> ModelOut:
        return cls(id=m.id, name=m.name, size=m.size, sha256=m.sha256,
                   created_at=m.created_at, weights=f"model:{m.id}")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    database: Literal["ok"] = "ok"
