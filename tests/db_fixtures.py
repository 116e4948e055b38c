"""The ``db_url`` fixture: an empty database on SQLite and on PostgreSQL, one per test.

PostgreSQL: a uniquely named database created on the server at ``TSPTQ_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped afterwards; the PostgreSQL
cases are skipped, with the reason, when that server cannot be reached.

Import it as ``from db_fixtures import db_url_fixture  # noqa: F401``: pytest registers it
under the name ``db_url``, and a different Python name keeps ruff's F811 quiet.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

PG_ADMIN_URL = os.environ.get("TSPTQ_TEST_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the test server, dropped afterwards; its URL.
    Raises ``pytest.skip`` when the server cannot be reached."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    name = f"tsptq_test_{uuid.uuid4().hex}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {make_url(PG_ADMIN_URL)!r}: "
                    f"{str(e.orig).strip().splitlines()[0] if e.orig else e}")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(name="db_url", params=["sqlite", "postgresql"])
def db_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tsptq.db'}"
        return
    with pg_database() as url:
        yield url
