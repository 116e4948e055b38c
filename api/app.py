"""The FastAPI application.

    uvicorn api.app:create_app --factory      # settings from TSPTQ_* environment variables

``create_app`` neither creates nor migrates the database (``tsptq db upgrade`` does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import __version__, errors
from api.deps import BearerAuth, bearer_documented
from api.routes import artifacts, health, jobs, models
from service.settings import Settings, get_settings
from service.store import Store

DESCRIPTION = """Post-training quantization of vision transformers (TSPTQ-ViT) as a service.

Submit a job (`POST /jobs`, `{}` quantizes the bundled digits ViT at W8A8), poll
`GET /jobs/{id}`, then download its artifacts (`GET /jobs/{id}/artifacts`,
`GET /artifacts/{id}`). Upload your own safetensors weights with `POST /models` and name them in
a job as `"weights": "model:{id}"`. When the server sets `TSPTQ_API_TOKEN`, every route but
`/healthz` needs `Authorization: Bearer <token>`."""


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment) on ``store`` (default: a new
    store on ``settings.db_url``, whose engine is disposed when the app shuts down)."""
    settings = settings or get_settings()
    owned = store is None
    if store is None:
        store = Store.from_url(settings.db_url, chunk_bytes=settings.chunk_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            store.engine.dispose()

    app = FastAPI(title="tsptq", version=__version__, description=DESCRIPTION,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    errors.install(app)

    protected: dict = {}
    if settings.api_token:
        app.add_middleware(BearerAuth, token=settings.api_token)
        protected = {"dependencies": [Depends(bearer_documented)],
                     "responses": errors.responses(401)}
    app.include_router(health.router)
    for module in (jobs, artifacts, models):
        app.include_router(module.router, **protected)
    return app
