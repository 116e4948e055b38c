"""Initial schema: jobs, candidates, artifacts and uploaded models (chunked payloads).

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out explicitly rather than imported from ``service.models``, so later model changes
cannot rewrite history; ``tests/test_migrations.py`` checks that head still matches the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _created_at() -> sa.Column:
    return sa.Column("created_at", _utc(), nullable=False)


def _chunks(table: str, owner: str, parent: str) -> None:
    op.create_table(
        table,
        sa.Column(owner, sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint([owner], [f"{parent}.id"], ondelete="CASCADE",
                                name=f"fk_{table}_{owner}_{parent}"),
        sa.PrimaryKeyConstraint(owner, "seq", name=f"pk_{table}"),
    )


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("timings", sa.JSON(none_as_null=True), nullable=True),
        _created_at(),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.Column("claims", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_jobs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])

    op.create_table(
        "candidates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("key", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("kl", sa.Double(), nullable=False),
        sa.Column("agreement", sa.Double(), nullable=False),
        sa.Column("costs", sa.JSON(none_as_null=True), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name="fk_candidates_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_candidates"),
        sa.UniqueConstraint("job_id", "key", name="uq_candidates_job_id_key"),
    )
    op.create_index("ix_candidates_job_id", "candidates", ["job_id"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=False),
        _created_at(),
        sa.CheckConstraint("kind IN ('checkpoint', 'report', 'plot')", name="ck_artifacts_kind"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name="fk_artifacts_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),
    )
    op.create_index("ix_artifacts_job_id", "artifacts", ["job_id"])
    _chunks("artifact_chunks", "artifact_id", "artifacts")

    op.create_table(
        "uploaded_models",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_uploaded_models"),
    )
    _chunks("model_chunks", "model_id", "uploaded_models")


def downgrade() -> None:
    op.drop_table("model_chunks")
    op.drop_table("uploaded_models")
    op.drop_table("artifact_chunks")
    op.drop_index("ix_artifacts_job_id", table_name="artifacts")
    op.drop_table("artifacts")
    op.drop_index("ix_candidates_job_id", table_name="candidates")
    op.drop_table("candidates")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
