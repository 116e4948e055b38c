"""The FastAPI application.

    uvicorn api.app:create_app --factory      # settings from TSPTQ_* environment variables
    uvicorn api.app:serve_app --factory       # the same, warmed up (what tsptq serve runs)

``create_app`` neither creates nor migrates the database (``tsptq db upgrade`` does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from api import __version__, errors
from api.deps import BearerAuth, bearer_documented
from api.limits import BodyLimit
from api.routes import artifacts, health, jobs, models, ui
from service.jobspec import JobSpec
from service.settings import Settings, get_settings
from service.store import Store

DESCRIPTION = """Post-training quantization of vision transformers (TSPTQ-ViT) as a service.

Submit a job (`POST /jobs`, `{}` quantizes the bundled digits ViT at W8A8), poll
`GET /jobs/{id}`, then download its artifacts (`GET /jobs/{id}/artifacts`,
`GET /artifacts/{id}`). Upload your own safetensors weights with `POST /models` and name them in
a job as `"weights": "model:{id}"`. When the server sets `TSPTQ_API_TOKEN`, every route but
`/healthz` needs `Authorization: Bearer <token>` (the web dashboard at `/ui` asks for it)."""


def create_app(settings: Settings | None = None, store: Store | None = None, *,
               server: bool = False) -> FastAPI:
    """The API for ``settings`` (default: from the environment) on ``store`` (default: a new
    store on ``settings.db_url``, whose engine is disposed when the app shuts down).

    ``server``: the app is the whole life of its process (``serve_app``): at startup it checks
    the default model once (~80 ms of CPU, see ``api.routes.jobs.model_problem``), so that the
    first requests do not queue behind it."""
    settings = settings or get_settings()
    owned = store is None
    if store is None:
        store = Store.from_url(settings.db_url, chunk_bytes=settings.chunk_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if server:
            await run_in_threadpool(jobs.model_problem, JobSpec().model)
        yield
        if owned:
            store.engine.dispose()

    app = FastAPI(title="tsptq", version=__version__, description=DESCRIPTION,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    errors.install(app)
    app.add_middleware(BodyLimit)  # inside BearerAuth (added last, so outermost)

    protected: dict = {}
    if settings.api_token:
        app.add_middleware(BearerAuth, token=settings.api_token)
        protected = {"dependencies": [Depends(bearer_documented)],
                     "responses": errors.responses(401)}
    app.include_router(health.router)
    app.include_router(ui.router)  # the dashboard's shell: no job data, open (api.deps.is_open)
    for module in (jobs, artifacts, models):
        app.include_router(module.router, **protected)
    return app


def serve_app() -> FastAPI:
    """``create_app(server=True)`` with settings from the environment: what ``tsptq serve``
    runs (a factory for ``uvicorn --factory``)."""
    return create_app(server=True)
