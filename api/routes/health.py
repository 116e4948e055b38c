"""Liveness and readiness: open even when a bearer token is required."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import StoreDep
from api.errors import responses
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=responses(503),
            summary="Health of the API and its database")
def healthz(store: StoreDep) -> Health:
    """200 when the database answers; 503 (with Retry-After) when it does not."""
    store.ping()  # DatabaseUnavailable → 503
    return Health(status="ok", database="ok")
