"""A limit on request bodies: a job request is a few hundred bytes of JSON, so a body of
megabytes is refused (413) before it is read whole into memory and parsed.

Uploads (``POST /models``) are exempt: they stream to a temporary file under their own,
configurable limit (``TSPTQ_MAX_UPLOAD_BYTES``).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1 << 20
EXEMPT_PATHS = frozenset({"/models"})


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


class BodyLimit:
    """Answer 413 to a request whose ``Content-Length`` exceeds ``limit``; a body sent without
    one (chunked) is counted as it arrives and stopped at the limit."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                if value.isdigit() and int(value) > self.limit:
                    refusal = JSONResponse({"detail": _too_large(self.limit)}, status_code=413,
                                           headers={"Connection": "close"})
                    await refusal(scope, receive, send)
                    return
                break
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading: the app's handler
                    # answers 413.
                    raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, counted, send)
