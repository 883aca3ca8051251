"""Initial schema: jobs, clients, rounds, updates, model_versions, artifacts.

Revision ID: 0001
Revises:
Create Date: 2025-11-20

Hand-written to match server_api/db/models.py; tests/test_db.py checks that the two agree. Constraint
names follow the models' naming convention (``ck_<table>_<name>``, ``uq_<table>_<cols>``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _now(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def _sha(name: str, nullable: bool) -> sa.Column:
    return sa.Column(name, sa.String(64), nullable=nullable)


def _status(name: str, default: str | None) -> sa.Column:
    server_default = sa.text(f"'{default}'") if default is not None else None
    return sa.Column(name, sa.String(16), server_default=server_default, nullable=False)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("config", _json(), nullable=False),
        _status("status", "created"),
        sa.Column("current_round", sa.Integer(), server_default="0", nullable=False),
        _now("created_at"),
        _now("updated_at"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('created', 'running', 'finished', 'failed')", name=op.f("ck_jobs_status")
        ),
        sa.CheckConstraint("current_round >= 0", name=op.f("ck_jobs_current_round_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )

    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        _now("created_at"),
        sa.CheckConstraint("length(sha256) = 64", name=op.f("ck_artifacts_sha256_length")),
        sa.CheckConstraint("size >= 0", name=op.f("ck_artifacts_size_nonnegative")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_artifacts")),
    )

    op.create_table(
        "clients",
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("device_info", _json(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        _now("first_seen"),
        _now("last_seen"),
        _status("status", "online"),
        sa.Column("state_version", sa.Integer(), nullable=True),
        sa.CheckConstraint("status IN ('online', 'offline')", name=op.f("ck_clients_status")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_clients_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "client_id", name=op.f("pk_clients")),
    )

    op.create_table(
        "model_versions",
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("round_index", sa.Integer(), nullable=True),
        _now("created_at"),
        _sha("state_sha256", nullable=False),
        _sha("model_onnx_sha256", nullable=False),
        _sha("predictor_onnx_sha256", nullable=False),
        _sha("generator_onnx_sha256", nullable=True),
        _sha("generator_state_sha256", nullable=True),
        _sha("server_state_sha256", nullable=True),
        _sha("delta_sha256", nullable=True),
        sa.Column("delta_base_version", sa.Integer(), nullable=True),
        sa.CheckConstraint("version >= 0", name=op.f("ck_model_versions_version_nonnegative")),
        sa.CheckConstraint(
            "(delta_sha256 IS NULL AND delta_base_version IS NULL) "
            "OR (delta_sha256 IS NOT NULL AND delta_base_version IS NOT NULL)",
            name=op.f("ck_model_versions_delta_complete"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_model_versions_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "version", name=op.f("pk_model_versions")),
    )

    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        _status("status", "open"),
        sa.Column("selected", _json(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        _now("started_at"),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("generator_loss", sa.Float(), nullable=True),
        sa.Column("bytes_up", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("num_updates", sa.Integer(), server_default="0", nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('open', 'aggregating', 'closed', 'failed')", name=op.f("ck_rounds_status")
        ),
        sa.CheckConstraint('"index" >= 0 AND attempt >= 0', name=op.f("ck_rounds_index_attempt_nonnegative")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_rounds_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("job_id", "index", "attempt", name=op.f("uq_rounds_job_id_index_attempt")),
    )

    op.create_table(
        "updates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("label_counts", _json(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        _status("status", None),
        sa.Column("reason", sa.Text(), nullable=True),
        _sha("payload_sha256", nullable=True),
        sa.Column("payload_bytes", sa.Integer(), server_default="0", nullable=False),
        _now("received_at"),
        sa.CheckConstraint("status IN ('accepted', 'rejected')", name=op.f("ck_updates_status")),
        sa.CheckConstraint(
            "num_samples >= 0 AND payload_bytes >= 0", name=op.f("ck_updates_sizes_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_updates_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_updates_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_updates")),
        sa.UniqueConstraint("job_id", "idempotency_key", name=op.f("uq_updates_job_id_idempotency_key")),
    )
    op.create_index("ix_updates_round_id_status", "updates", ["round_id", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_updates_round_id_status", table_name="updates")
    op.drop_table("updates")
    op.drop_table("rounds")
    op.drop_table("model_versions")
    op.drop_table("clients")
    op.drop_table("artifacts")
    op.drop_table("jobs")
