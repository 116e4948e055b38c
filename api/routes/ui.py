"""The dashboard's shell: two HTML pages and their JavaScript and CSS, from ``api/ui/``.

The files hold no job data (the pages fetch it from the JSON API with ``fetch()``, sending the
bearer token a person typed in), so they are served without the token (``api.deps.is_open``)
and are left out of the OpenAPI schema: they are not part of the API. The files are read once,
at import: a fixed set of names, so no request path ever reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Nothing from elsewhere: scripts and styles from these files only (no inline script), images
# from the API (histograms arrive as blobs when a token is needed), no framing by other sites.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


# Page -> its script. ``shell.html`` is the frame both pages share (head, top bar, token
# prompt); ``<page>.html`` holds only what goes in its ``<main>``.
PAGES = {"jobs": "jobs.js", "job": "job.js"}


def _load() -> dict[str, tuple[bytes, str]]:
    files = {p.name: (p.read_bytes(), MEDIA[p.suffix])
             for p in sorted(UI_DIR.iterdir()) if p.suffix in MEDIA and p.suffix != ".html"}
    shell = (UI_DIR / "shell.html").read_text(encoding="utf-8")
    for page, script in PAGES.items():
        main = (UI_DIR / f"{page}.html").read_text(encoding="utf-8")
        html = shell.replace("{title}", page).replace("{script}", script).replace("{main}", main)
        files[f"{page}.html"] = (html.encode("utf-8"), MEDIA[".html"])
    return files


FILES = _load()


def _file(name: str) -> Response:
    body, media_type = FILES[name]
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    """A browser that opens the server lands on the jobs list."""
    return RedirectResponse("/ui", status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@router.get("/ui")
def jobs_page() -> Response:
    return _file("jobs.html")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> Response:
    """The same shell for every id: the page reads the id from its URL and asks the API (an
    unknown id shows the API's 404 message there)."""
    return _file("job.html")


@router.get("/ui/static/{name}")
def static_file(name: str) -> Response:
    if name not in FILES or name.endswith(".html"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dashboard file {name!r}")
    return _file(name)
