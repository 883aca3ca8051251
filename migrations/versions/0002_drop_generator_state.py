"""Drop model_versions.generator_state_sha256: never written (the generator's state is part of the server-state
blob, server_state_sha256).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("generator_state_sha256")


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("generator_state_sha256", sa.String(64), nullable=True))
