"""Exception handlers, and the error responses routes declare in the OpenAPI schema.

Every error body is ``{"detail": ...}``: a sentence, or (422 from request validation) FastAPI's
list of issues, made JSON-safe whatever the client sent.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from api.schemas import ErrorOut, ValidationErrorOut
from service.store import DatabaseUnavailable, NotFound, StoreError, TooLarge

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
MAX_ECHO = 200  # characters of an offending string input repeated in a 422
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_DESCRIPTIONS = {
    400: "The body could not be read (e.g. it is not valid UTF-8)",
    401: "Missing or wrong bearer token",
    404: "No such resource",
    409: "The resource is not in a state that allows this",
    413: "The request body or upload is larger than the server accepts",
    415: "The file type is refused",
    422: "The request is not acceptable",
    500: "Internal error",
    503: "The database is unavailable; retry later (see Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error ``codes`` a route can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {
            "model": ValidationErrorOut if code == 422 else ErrorOut,
            "description": _DESCRIPTIONS[code],
        }
        if code == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait",
                                                "schema": {"type": "integer"}}}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[code] = entry
    return out


def json_safe(value: Any) -> Any:
    """``value`` with everything strict UTF-8 JSON cannot carry turned into strings: bytes
    (decoded with replacement), lone surrogates, NaN and infinities, and any other object (its
    ``str``)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):  # lone surrogates (legal in JSON escapes) cannot be UTF-8
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", errors="replace").decode("utf-8")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return str(value)


def _validation_issues(exc: RequestValidationError) -> list[dict[str, Any]]:
    issues = []
    for err in exc.errors():
        issue: dict[str, Any] = {
            "loc": [p if isinstance(p, int) and not isinstance(p, bool) else str(p)
                    for p in err.get("loc", ())],
            "msg": json_safe(str(err.get("msg", ""))),
            "type": str(err.get("type", "")),
        }
        if "input" in err:
            issue["input"] = _shortened(json_safe(err["input"]))
        if err.get("ctx") is not None:
            issue["ctx"] = json_safe(err["ctx"])
        issues.append(issue)
    return issues


def _shortened(value: Any) -> Any:
    """A long string input cut to ``MAX_ECHO`` characters: the answer need not repeat a
    megabyte the client sent."""
    if isinstance(value, str) and len(value) > MAX_ECHO:
        return f"{value[:MAX_ECHO]}... ({len(value)} characters)"
    return value


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": _validation_issues(exc)})


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer, except that 405 lists in ``Allow`` the methods of *every* route on
    the path (Starlette names only those of the first route it finds there)."""
    if exc.status_code == 405:
        # Ask the router which methods would match fully (included routers hide their routes).
        allowed = [m for m in HTTP_METHODS
                   if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                          for route in request.app.router.routes)]
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


async def _on_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
    text = str(exc)
    if not text.startswith("database "):
        text = f"database unavailable: {text}"
    return JSONResponse(status_code=503, content={"detail": f"{text}; retry later"},
                        headers={"Retry-After": str(RETRY_AFTER_S)})


async def _on_not_found(_: Request, exc: NotFound) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc) or "not found"})


async def _on_too_large(_: Request, exc: TooLarge) -> JSONResponse:
    return JSONResponse(status_code=413, content={"detail": str(exc)})


async def _on_store_error(request: Request, exc: StoreError) -> JSONResponse:
    # The last resort: the routes check what they can, so this means a bug or corrupt data.
    log.error("store error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": f"internal store error: {exc}"})


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged (with the traceback) by the server; the client gets a JSON body all the same.
    return JSONResponse(status_code=500, content={"detail": "internal server error"})


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (the most specific exception class wins)."""
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(DatabaseUnavailable, _on_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _on_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(TooLarge, _on_too_large)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, _on_store_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
