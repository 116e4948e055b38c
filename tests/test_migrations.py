"""The migrations build the schema the models describe, and undo it, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from db_fixtures import db_url_fixture  # noqa: F401
from sqlalchemy import inspect

from service.db import downgrade, make_engine, upgrade
from service.models import Base

TABLES = {"jobs", "candidates", "artifacts", "artifact_chunks", "uploaded_models",
          "model_chunks"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url):
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    upgrade(db_url)  # at head already: nothing to do
    downgrade(db_url)
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES


def test_head_matches_models(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
            indexes = {ix["name"] for t in TABLES for ix in inspect(conn).get_indexes(t)}
            uniques = {uq["name"] for t in TABLES
                       for uq in inspect(conn).get_unique_constraints(t)}
    finally:
        engine.dispose()
    assert {"ix_jobs_status", "ix_jobs_created_at", "ix_candidates_job_id",
            "ix_artifacts_job_id"} <= indexes
    assert {"uq_candidates_job_id_key", "uq_artifacts_job_id_name"} <= uniques
