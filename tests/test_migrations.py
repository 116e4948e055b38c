"""The migrations build the schema the models describe, and undo it, on both backends; an
upgrade from every released revision keeps every stored row and byte; a database newer than
the code is refused untouched."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from db_fixtures import db_url_fixture  # noqa: F401
from procs import REPO, free_port
from sqlalchemy import MetaData, insert, inspect, select, text

from service.db import (
    SchemaTooNew,
    alembic_config,
    downgrade,
    make_engine,
    schema_revision,
    upgrade,
)
from service.models import Base
from service.store import Store

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


# -- upgrades keep every stored row ------------------------------------------------------------

# What a database at each released revision can hold: each later migration adds its own case
# (the artifact kinds it allows, a column it adds with the rows that fill it).
ARTIFACT_KINDS_AT = {"0001": ("checkpoint", "report", "plot"),
                     "0002": ("checkpoint", "report", "plot", "onnx")}
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _revisions() -> list[str]:
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(scripts.walk_revisions()))]


def _fill(engine, revision: str) -> None:
    """Jobs in every status with candidates, artifacts of every kind with their bytes, and an
    uploaded model, written with the tables as they are at ``revision`` (reflected, not the
    models of today)."""
    rng = random.Random(revision)
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    with engine.begin() as conn:
        for i, status in enumerate(STATUSES):
            job = f"{i:032x}"
            ended = status in ("succeeded", "failed", "cancelled")
            conn.execute(insert(t["jobs"]).values(
                id=job, status=status, request={"model": "digits_vit", "i": i,
                                                "search": {"strategy": "thresholds"}},
                progress_done=i, progress_total=8, stage="search" if i else None,
                error="boom" if status == "failed" else None,
                result={"top1": 0.97, "search": {"key": "k0"}} if status == "succeeded" else None,
                timings={"total_s": 1.5} if ended else None, created_at=now,
                started_at=now if status != "queued" else None,
                finished_at=now if ended else None,
                claimed_by="host:1:abc" if status == "running" else None,
                heartbeat_at=now if status == "running" else None, claims=min(i, 2),
                cancel_requested=status == "cancelled"))
            for c in range(3):
                conn.execute(insert(t["candidates"]).values(
                    job_id=job, key=f"k{c}", seq=c, spec={"a_bits": 8, "c": c}, kl=0.01 * c,
                    agreement=1 - 0.01 * c, costs={"weight_bits": 8.0}, created_at=now))
            for k, kind in enumerate(ARTIFACT_KINDS_AT[revision]):
                art = f"{i:016x}{k:016x}"
                blob = rng.randbytes(rng.randrange(1, 5000))
                conn.execute(insert(t["artifacts"]).values(
                    id=art, job_id=job, kind=kind, name=f"{kind}.bin", size=len(blob),
                    sha256=hashlib.sha256(blob).hexdigest(), media_type="application/x",
                    created_at=now))
                for seq in range(0, len(blob), 1024):
                    conn.execute(insert(t["artifact_chunks"]).values(
                        artifact_id=art, seq=seq // 1024, data=blob[seq:seq + 1024]))
        blob = rng.randbytes(3000)
        conn.execute(insert(t["uploaded_models"]).values(
            id="f" * 32, name="mine.safetensors", size=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(), created_at=now))
        conn.execute(insert(t["model_chunks"]).values(model_id="f" * 32, seq=0, data=blob))


def _snapshot(engine) -> dict[str, list[tuple]]:
    """Every row of every table, as the driver returns it, in primary-key order."""
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for name in TABLES:
            table = meta.tables[name]
            out[name] = [tuple(r) for r in conn.execute(
                select(table).order_by(*table.primary_key.columns))]
    return out


@pytest.mark.parametrize("start", _revisions()[:-1])
def test_upgrade_keeps_every_stored_row(db_url, start):
    upgrade(db_url, start)
    engine = make_engine(db_url)
    try:
        _fill(engine, start)
        before = _snapshot(engine)
    finally:
        engine.dispose()
    assert len(before["jobs"]) == len(STATUSES) and before["artifact_chunks"]
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        after = _snapshot(engine)
    finally:
        engine.dispose()
    for name in TABLES:  # a column a migration adds comes last: the old ones are unchanged
        width = len(before[name][0])
        assert [r[:width] for r in after[name]] == before[name], name
    store = Store.from_url(db_url)
    try:  # and the service reads them: every artifact's and model's bytes check out
        jobs, total = store.list_jobs(limit=100)
        assert total == len(STATUSES) and {j.status for j in jobs} == set(STATUSES)
        for job in jobs:
            arts = store.artifacts(job.id)
            assert {a.kind for a in arts} == set(ARTIFACT_KINDS_AT[start])
            for a in arts:
                assert hashlib.sha256(b"".join(store.iter_artifact(a.id))).hexdigest() == a.sha256
            assert len(store.candidates(job.id)) == 3
        model = store.get_model("f" * 32)
        assert hashlib.sha256(b"".join(store.iter_model(model.id))).hexdigest() == model.sha256
    finally:
        store.engine.dispose()


def test_a_database_newer_than_the_code_is_refused(db_url, tmp_path):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        before = _snapshot(engine)
    finally:
        engine.dispose()
    with pytest.raises(SchemaTooNew, match="revision '9999_future', which this tsptq does not"):
        upgrade(db_url)
    with pytest.raises(SchemaTooNew):
        downgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSPTQ_")}
    env |= {"TSPTQ_DATABASE_URL": db_url, "TSPTQ_DATA_DIR": str(tmp_path)}
    for args in (["db", "upgrade"], ["serve", "--port", str(free_port())]):
        run = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env,
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert "newer tsptq migrated it" in run.stderr and "nothing was changed" in run.stderr
        assert "Traceback" not in run.stderr + run.stdout
    assert schema_revision(db_url) == "9999_future"
    engine = make_engine(db_url)
    try:
        assert _snapshot(engine) == before  # not half-migrated
    finally:
        engine.dispose()
