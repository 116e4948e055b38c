"""Artifact downloads, streamed chunk by chunk from the database (never whole in memory)."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, HTTPException, Response, status
from fastapi.responses import StreamingResponse

from api.deps import StoreDep
from api.errors import responses

router = APIRouter(prefix="/artifacts", tags=["artifacts"])

ID = re.compile(r"^[0-9a-f]{32}$")
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# What the dispatcher writes: checkpoints, report.json, PNG plots (and anything else as */*).
MEDIA_TYPES = ("application/octet-stream", "application/json", "image/png", "*/*")
UNFINISHED = ("queued", "running")


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII fallback ``filename`` and the exact UTF-8 ``filename*``."""
    fallback = re.sub(r'[^A-Za-z0-9._ -]', "_", name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _matches(if_none_match: str, etag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


@router.get(
    "/{artifact_id}", response_class=StreamingResponse, response_model=None,
    responses={
        200: {"description": "The artifact's bytes, with Content-Length and X-Content-SHA256",
              "content": {m: _BINARY for m in MEDIA_TYPES},
              "headers": {"X-Content-SHA256": {"description": "hex sha256 of the body",
                                               "schema": {"type": "string"}},
                          "ETag": {"schema": {"type": "string"}},
                          "Content-Disposition": {"schema": {"type": "string"}}}},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **responses(404, 409, 422, 503),
    },
    summary="Download an artifact")
def download_artifact(
    artifact_id: str, store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Streams the artifact as stored (its sha256 is checked when it is written); the
    ``X-Content-SHA256`` header lets the client verify what it received. 409 while its job is
    queued or running: a job that is run again (its dispatcher died) rewrites its artifacts,
    so they are final only once it has finished."""
    artifact = store.get_artifact(artifact_id) if ID.match(artifact_id) else None
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {artifact_id!r}")
    job = store.get_job(artifact.job_id)
    if job is not None and job.status in UNFINISHED:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"job {job.id} is {job.status}: its artifacts can be downloaded "
                            "once it has finished")
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "X-Content-SHA256": artifact.sha256}
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    chunks = store.iter_artifact(artifact_id)  # NotFound (→ 404) if it vanished meanwhile
    headers.update({"Content-Length": str(artifact.size),
                    "Content-Disposition": content_disposition(artifact.name)})
    return StreamingResponse(chunks, media_type=artifact.media_type, headers=headers)
