"""Service configuration, read from ``TSPTQ_*`` environment variables (pydantic-settings).

Every value has a default that works on one machine with no setup: a SQLite database and the
datasets folder under ``./.tsptq``. ``get_settings()`` builds a fresh ``Settings`` on each call,
so tests change the environment (``monkeypatch.setenv``) and see the change immediately.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    """Configuration of the API, the dispatcher and the store; env prefix ``TSPTQ_``.

    List values come as JSON, e.g. ``TSPTQ_DATA_ROOTS='["/data/imagenet", "/data/cifar"]'``.
    """

    model_config = SettingsConfigDict(env_prefix="TSPTQ_", extra="ignore")

    data_dir: Path = Path(".tsptq")
    database_url: str | None = None
    api_token: str | None = None
    # Roots under which ImageFolder data dirs named in job requests must lie; empty means
    # ``[data_dir / "datasets"]``.
    data_roots: list[Path] = Field(default_factory=list)
    max_upload_bytes: int = Field(512 * MiB, gt=0)
    chunk_bytes: int = Field(MiB, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(30.0, gt=0)
    # Claims of a job whose dispatchers all stopped without finishing it, after which the job
    # is failed rather than requeued (it would crash the next one too).
    max_attempts: int = Field(3, ge=1)
    ray_workers: int = Field(2, ge=1)
    torch_threads: int = Field(1, ge=1, description="torch threads of a dispatcher process")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @model_validator(mode="after")
    def _defaults_and_checks(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        self.data_roots = [p.expanduser() for p in self.data_roots] or [
            self.data_dir / "datasets"]
        # A job whose heartbeat is merely late must not be requeued while its worker still runs.
        if self.stale_after_s <= self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s}) must exceed heartbeat_s "
                             f"({self.heartbeat_s})")
        return self

    @property
    def db_url(self) -> str:
        """``database_url``, or a SQLite file in ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'tsptq.db'}"


def get_settings() -> Settings:
    """A fresh ``Settings`` from the current environment (deliberately not cached)."""
    return Settings()
