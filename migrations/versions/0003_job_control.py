"""Jobs can be paused and cancelled: the statuses `paused` and `cancelled`.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OLD = "status IN ('created', 'running', 'finished', 'failed')"
NEW = "status IN ('created', 'running', 'paused', 'finished', 'failed', 'cancelled')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_status"), NEW)


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    op.execute("UPDATE jobs SET status = 'running' WHERE status = 'paused'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_status"), OLD)
