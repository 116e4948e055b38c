"""Engines, sessions and migrations for SQLite (one machine) and PostgreSQL (several).

SQLite: Python's sqlite3 module opens transactions lazily and only before DML, so a read
followed by a write is not one transaction. We take over: the driver is put in autocommit and
every SQLAlchemy transaction emits its own ``BEGIN`` (the recipe in SQLAlchemy's SQLite docs).
A connection whose execution options set ``SQLITE_IMMEDIATE`` begins with ``BEGIN IMMEDIATE``
and so holds the write lock from its first statement: that is how the store serialises
read-then-write transactions (claiming a job) across processes sharing one database file.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_IMMEDIATE = "tsptq_sqlite_immediate"
BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; plain ``postgresql://`` (or ``postgres://``) URLs get the psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True) -> Engine:
    """An engine for ``url``. ``sqlite_foreign_keys=False`` is for migrations only: SQLite's batch
    mode recreates tables, and dropping a referenced table with foreign keys on would cascade."""
    u = normalize_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    kwargs: dict = {"connect_args": {"check_same_thread": False,
                                     "timeout": BUSY_TIMEOUT_MS / 1000}}
    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:  # one in-memory database shared by every thread
        kwargs["poolclass"] = StaticPool
    engine = create_engine(u, **kwargs)
    _sqlite_hooks(engine, foreign_keys=sqlite_foreign_keys)
    return engine


def _sqlite_hooks(engine: Engine, *, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # no implicit BEGIN: _on_begin emits it
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        immediate = conn.get_execution_options().get(SQLITE_IMMEDIATE)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the store returns them detached)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | URL) -> Config:
    """An Alembic config for ``migrations/`` and ``url``; no alembic.ini needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': escape it (percent-encoded passwords).
    rendered = normalize_url(url).render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


class SchemaTooNew(ValueError):
    """The database was migrated by a newer tsptq than this one."""


def schema_revision(url: str | URL) -> str | None:
    """The database's migration revision (None: never migrated)."""
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def check_not_newer(url: str | URL) -> None:
    """Raise ``SchemaTooNew`` if the database is at a revision this code does not know: a newer
    tsptq migrated it, and this one would misread its rows or half-migrate it."""
    current = schema_revision(url)
    scripts = ScriptDirectory.from_config(alembic_config(url))
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current is not None and current not in known:
        raise SchemaTooNew(
            f"the database {normalize_url(url).render_as_string(hide_password=True)} is at "
            f"schema revision {current!r}, which this tsptq does not know (its newest is "
            f"{scripts.get_current_head()!r}): a newer tsptq migrated it. Run that version, or "
            f"upgrade this installation; nothing was changed.")


def upgrade(url: str | URL, rev: str = "head") -> None:
    """Migrate the database at ``url`` up to ``rev``; ``SchemaTooNew`` (and nothing changed)
    if a newer tsptq migrated it already."""
    check_not_newer(url)
    command.upgrade(alembic_config(url), rev)


def downgrade(url: str | URL, rev: str = "base") -> None:
    """Migrate the database at ``url`` down to ``rev`` (everything, by default)."""
    check_not_newer(url)
    command.downgrade(alembic_config(url), rev)
