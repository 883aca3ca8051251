"""Devices with different models: which model each update was trained with (updates.model, NULL for rows
written before it) and each closed round's statistics per model (rounds.model_stats, NULL for a one-model job).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("model", sa.String(32), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("model_stats", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("model_stats")
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("model")
