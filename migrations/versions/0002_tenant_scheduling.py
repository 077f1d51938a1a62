"""Tenant scheduling (issue #19): ``jobs.priority`` (within a tenant, higher first), and an index for the
schedulers' look at queued jobs by tenant.

Revision ID: 0002_tenant_scheduling
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_tenant_scheduling"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_jobs_state_queue_tenant_id", "jobs", ["state", "queue", "tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_queue_tenant_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
