"""Several server processes on one job: the lease that says which one runs its rounds (job_leases), and at
most one accepted update per client and round whichever process accepted it (a partial unique index).
Updates accepted together are stored in one pack file: where each lies (updates.payload_pack, _offset,
_length; NULL for rows written before, whose payload is a blob of its own).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ACCEPTED = sa.text("status = 'accepted'")


def upgrade() -> None:
    op.create_table(
        "job_leases",
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_leases_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_leases")),
    )
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("payload_pack", sa.String(32), nullable=True))
        batch.add_column(sa.Column("payload_offset", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("payload_length", sa.BigInteger(), nullable=True))
    op.create_index("uq_updates_round_id_client_id_accepted", "updates", ["round_id", "client_id"], unique=True,
                    sqlite_where=ACCEPTED, postgresql_where=ACCEPTED)


def downgrade() -> None:
    op.drop_index("uq_updates_round_id_client_id_accepted", table_name="updates")
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("payload_length")
        batch.drop_column("payload_offset")
        batch.drop_column("payload_pack")
    op.drop_table("job_leases")
