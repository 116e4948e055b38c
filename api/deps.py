"""Dependencies (the app's settings and store) and bearer-token authentication.

Authentication is an ASGI middleware, not a per-route dependency, so that no route can forget
it and it also covers ``/docs`` and ``/openapi.json``; only ``/healthz`` stays open (for load
balancers and orchestrators), with the dashboard's shell: ``/`` (a redirect), and ``/ui`` and
everything below it, static HTML, JavaScript and CSS that carry no job data (the pages fetch
that from the API with the token the person types in). A refused request does nothing: the
middleware answers 401 before any route runs or any body is read.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings
from service.store import Store

OPEN_PATHS = frozenset({"/healthz", "/"})
# The dashboard's shell (api.routes.ui): pages and static files without job data.
OPEN_PREFIX = "/ui"


def is_open(path: str) -> bool:
    """Whether ``path`` is served without the token: ``OPEN_PATHS``, ``/ui`` and ``/ui/...``
    (not ``/uix``)."""
    return path in OPEN_PATHS or path == OPEN_PREFIX or path.startswith(OPEN_PREFIX + "/")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]

# Documents the scheme in OpenAPI (the middleware below enforces it).
_bearer = HTTPBearer(auto_error=False, description="the server's TSPTQ_API_TOKEN")


def bearer_documented(
        _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    """A no-op dependency that makes OpenAPI show the bearer scheme on a router's routes."""


def token_matches(header: str | None, token: str) -> bool:
    """Whether ``header`` (decoded as latin-1, i.e. its raw bytes) is ``Bearer <token>``, the
    scheme in any case, compared in constant time with the token's UTF-8 bytes."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("latin-1"),
                               token.encode("utf-8"))


class BearerAuth:
    """Answer 401 (``WWW-Authenticate: Bearer``) to every HTTP request but those to
    open paths (``is_open``) unless it carries ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value.decode("latin-1")
                break
        if token_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        reason = "missing bearer token" if header is None else "wrong bearer token"
        refusal = JSONResponse({"detail": f"{reason}: send 'Authorization: Bearer <token>'"},
                               status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await refusal(scope, receive, send)
