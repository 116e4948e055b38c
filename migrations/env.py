"""Alembic environment: migrates the database at the config's ``sqlalchemy.url``.

Each run is one transaction (SQLite's DDL is transactional too, with the BEGIN that
``service.db`` emits) and holds a lock for its duration, so two processes starting at once on
one database migrate it once: the second waits, then finds it at head.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from service.db import SQLITE_IMMEDIATE, make_engine
from service.models import Base

# Arbitrary constant key for PostgreSQL's advisory lock ("tsptq" in ASCII).
PG_LOCK_KEY = 0x7473707471

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    url = config.get_main_option("sqlalchemy.url") or ""
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=url.startswith("sqlite"),
        transactional_ddl=True,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
        context.run_migrations()


def run_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic config has no sqlalchemy.url: use service.db.upgrade(url)")
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            # SQLite: hold the write lock from the first statement (see service.db).
            connection.execution_options(**{SQLITE_IMMEDIATE: True})
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
