"""A Python client for the tsptq REST API (what ``tsptq submit/status/download/gate`` use).

    from service.client import ServiceClient

    with ServiceClient("http://127.0.0.1:8000") as client:   # or $TSPTQ_URL
        job = client.submit({"model": "digits_vit", "quant": {"w_bits": 8, "a_bits": 8}})
        job = client.wait(job["id"], on_progress=lambda j: print(j["progress"]))
        for artifact in client.artifacts(job["id"]):
            client.download(artifact, Path("out"))   # verified size and sha256

The URL defaults to ``$TSPTQ_URL`` (else ``http://127.0.0.1:8000``), the token to
``$TSPTQ_API_TOKEN`` (sent as ``Authorization: Bearer ...``). Every failure is a
``ServiceError``: an HTTP error carries the status and the server's ``detail``; a service that
cannot be reached has ``status None`` and says so; a download that does not match its listed
size and sha256 raises ``ChecksumError`` and leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20
# While waiting, this many consecutive transient failures (unreachable, 502/503/504) are retried
# before giving up: a service restarting under a long job should not fail the caller.
WAIT_RETRIES = 5


class ServiceError(Exception):
    """A failed call: ``status`` is the HTTP status (None when no answer came) and ``message``
    the server's ``detail`` (or what went wrong)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in (502, 503, 504)


class ChecksumError(ServiceError):
    """A downloaded artifact whose size or sha256 is not the one listed (nothing was kept)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    @property
    def transient(self) -> bool:
        return False


class WaitTimeout(ServiceError, TimeoutError):
    """``wait`` ran past its ``timeout_s``; the job goes on running on the service."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    @property
    def transient(self) -> bool:
        return False


class ServiceClient:
    """Thin, typed-by-convention access to the REST API; returns the server's JSON as dicts."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 timeout: float = 30) -> None:
        self.url = (url or os.environ.get("TSPTQ_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the service URL must start with http:// or https://, "
                             f"got {self.url!r}")
        token = token if token is not None else os.environ.get("TSPTQ_API_TOKEN")
        headers = {"Accept": "application/json", "User-Agent": "tsptq-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _unreachable(self, e: Exception) -> ServiceError:
        if isinstance(e, httpx.TimeoutException):
            return ServiceError(None, f"the service at {self.url} did not answer in time "
                                      f"({type(e).__name__})")
        reason = str(e).strip() or type(e).__name__
        return ServiceError(None, f"cannot reach the service at {self.url}: {reason}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        _raise_for_status(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as e:
            raise ServiceError(response.status_code, f"{method} {path}: the service answered "
                               "with something that is not JSON") from e

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``POST /jobs``: the queued job."""
        return self._json("POST", "/jobs", json=spec)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{_seg(job_id)}")

    def jobs(self, status: str | None = None, limit: int = 50,
             offset: int = 0) -> dict[str, Any]:
        """One page: ``{items, total, limit, offset}``, newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status
        return self._json("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """``DELETE /jobs/{id}``: the job afterwards (409 if it had already finished)."""
        return self._json("DELETE", f"/jobs/{_seg(job_id)}")

    def candidates(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/jobs/{_seg(job_id)}/candidates")

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The finished job's artifacts (409 while it is queued or running)."""
        return self._json("GET", f"/jobs/{_seg(job_id)}/artifacts")

    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll the job until it is succeeded, failed or cancelled and return it.
        ``on_progress(job)`` sees every poll; ``WaitTimeout`` after ``timeout_s`` seconds."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failures = 0
        while True:
            try:
                job = self.job(job_id)
                failures = 0
            except ServiceError as e:
                failures += 1
                if not e.transient or failures > WAIT_RETRIES:
                    raise
                job = None
            if job is not None:
                if on_progress is not None:
                    on_progress(job)
                if job.get("status") in FINISHED:
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} did not finish within {timeout_s:g} s "
                                  "(it goes on running on the service)")
            pause = poll_s if deadline is None else max(0.0, min(poll_s,
                                                                 deadline - time.monotonic()))
            time.sleep(pause)

    # -- files --------------------------------------------------------------------------------

    def download(self, artifact: dict[str, Any], dest: Path | str) -> Path:
        """Stream the artifact to ``dest`` (a file path, or an existing directory to put it in
        under its own name) and return the path.

        The bytes go to a temporary file beside ``dest``, chunk by chunk; the size and sha256
        are checked against the listing (``artifact``) and the response headers
        (``Content-Length``, ``X-Content-SHA256``) before the file is renamed into place. On
        any mismatch or error nothing is left behind (``ChecksumError``)."""
        try:
            artifact_id = str(artifact["id"])
            want_sha = str(artifact["sha256"]).lower()
            want_size = int(artifact["size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an artifact listing (needs id, size, sha256): {e}") from e
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / _safe_name(artifact.get("name") or artifact_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.",
                                        suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                header_sha, header_size, digest, size = self._stream_to(artifact_id, f)
            where = f"artifact {artifact_id} ({artifact.get('name', '?')})"
            if header_sha is None:
                raise ChecksumError(f"{where}: the service sent no X-Content-SHA256 header")
            if header_sha != want_sha:
                raise ChecksumError(f"{where}: the X-Content-SHA256 header {header_sha} is not "
                                    f"the listed sha256 {want_sha}")
            if header_size is not None and header_size != want_size:
                raise ChecksumError(f"{where}: Content-Length {header_size} is not the listed "
                                    f"size {want_size}")
            if size != want_size:
                raise ChecksumError(f"{where}: received {size} bytes, expected {want_size}")
            if digest != want_sha:
                raise ChecksumError(f"{where}: sha256 of the received bytes is {digest}, "
                                    f"expected {want_sha}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _stream_to(self, artifact_id: str, f) -> tuple[str | None, int | None, str, int]:
        """Write the artifact's bytes to ``f``: (header sha, header size, sha256, size)."""
        digest, size = hashlib.sha256(), 0
        try:
            with self._http.stream("GET", f"/artifacts/{_seg(artifact_id)}") as response:
                if response.is_error:
                    response.read()
                    _raise_for_status(response)
                header_sha = response.headers.get("x-content-sha256")
                length = response.headers.get("content-length")
                header_size = (int(length) if length and length.isdigit()
                               and "content-encoding" not in response.headers else None)
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return (header_sha.strip().lower() if header_sha else None, header_size,
                digest.hexdigest(), size)

    def upload_model(self, path: Path | str, name: str | None = None) -> dict[str, Any]:
        """``POST /models``: upload a safetensors file (streamed); the answer carries
        ``weights: "model:{id}"`` to put in a job's spec."""
        path = Path(path)
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return self._json("POST", "/models", params={"name": name or path.name},
                          content=chunks(),
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(size)})


def _seg(value: str) -> str:
    """``value`` as one URL path segment."""
    return quote(str(value), safe="")


def _safe_name(name: str) -> str:
    """A file name from a server-given artifact name: no directories, no hidden dot-files."""
    base = Path(str(name).replace("\\", "/")).name.lstrip(".")
    return base or "artifact"


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    raise ServiceError(response.status_code, _detail(response))


def _detail(response: httpx.Response) -> str:
    """The server's ``{"detail": ...}`` as one readable line (FastAPI's validation errors are
    a list of ``{loc, msg}``)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        text = response.text.strip()
        return text[:500] if text else response.reason_phrase or f"HTTP {response.status_code}"
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)
