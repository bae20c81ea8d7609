"""An index on a version's likeness gate (``versions.gate_status``): the reconcile pass of every
worker and ``serve`` (every 10 s, ``TrainingService`` via
``undecided_versions_of_ended_trainings``) reads the versions still pending, and went through
every version to find the few that are.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_versions_gate_status", "versions", ["gate_status"])


def downgrade() -> None:
    op.drop_index("ix_versions_gate_status", table_name="versions")
