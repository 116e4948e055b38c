"""Artifact kind ``onnx``: the integer program of an integer-setting job as an ONNX model.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01

Only the CHECK constraint on ``artifacts.kind`` changes. Batch mode: SQLite cannot alter a
constraint in place, so the table is recreated there (PostgreSQL alters it directly). The
downgrade deletes the ``onnx`` artifacts (their chunks go with them, ``ON DELETE CASCADE``)
before the old constraint comes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "kind IN ('checkpoint', 'report', 'plot')"
NEW = "kind IN ('checkpoint', 'report', 'plot', 'onnx')"


def _set_check(drop: str, create: str, sqltext: str) -> None:
    # Names go through the naming convention ("ck_%(table_name)s_%(constraint_name)s"): 0001's
    # name="ck_artifacts_kind" made ck_artifacts_ck_artifacts_kind; the models' name="kind"
    # makes ck_artifacts_kind, which this revision uses.
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_constraint(drop, type_="check")
        batch.create_check_constraint(create, sqltext)


def upgrade() -> None:
    _set_check("ck_artifacts_kind", "kind", NEW)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # no cascade with foreign keys off (migrations)
        bind.execute(sa.text("DELETE FROM artifact_chunks WHERE artifact_id IN "
                             "(SELECT id FROM artifacts WHERE kind = 'onnx')"))
    bind.execute(sa.text("DELETE FROM artifacts WHERE kind = 'onnx'"))
    _set_check("kind", "ck_artifacts_kind", OLD)
