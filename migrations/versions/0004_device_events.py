"""Device events: every device joining, changing state or leaving, so that `pipeshift history`
shows when the fleet changed (device add, drain, re-admit, the controller giving devices back);
and an apply's source (apply, rollback, drain, controller), so that a refresh completing it
records what it produced under the same source its own process would have.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=100), nullable=False),
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("state_from", sa.String(length=20), nullable=True),
        sa.Column("state_to", sa.String(length=20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_device_events_device", "device_events", ["device"])
    with op.batch_alter_table("applies") as batch:
        batch.add_column(sa.Column("source", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("applies") as batch:
        batch.drop_column("source")
    op.drop_index("ix_device_events_device", table_name="device_events")
    op.drop_table("device_events")
