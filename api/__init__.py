"""The tsptq REST API (FastAPI): ``create_app()`` in ``api.app``; run it with
``uvicorn api.app:create_app --factory`` (or ``tsptq serve``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tsptq")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
