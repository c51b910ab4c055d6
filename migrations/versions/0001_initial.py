"""The first schema: devices, configurations, plans, applies and locks.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("configurations",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("lineage", sa.String(length=36), nullable=False),
    sa.Column("serial", sa.Integer(), nullable=False),
    sa.Column("parent_id", sa.Integer(), nullable=True),
    sa.Column("model", sa.String(length=200), nullable=False),
    sa.Column("pipelines", sa.JSON(), nullable=False),
    sa.Column("epoch", sa.Integer(), nullable=True),
    sa.Column("predicted", sa.JSON(), nullable=True),
    sa.Column("spec", sa.JSON(), nullable=True),
    sa.Column("source", sa.String(length=20), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["parent_id"], ["configurations.id"], ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("lineage", "serial", name="uq_configurations_lineage_serial")
    )
    with op.batch_alter_table("configurations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_configurations_lineage"), ["lineage"], unique=False)

    op.create_table("devices",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=False),
    sa.Column("kind", sa.String(length=100), nullable=False),
    sa.Column("node", sa.String(length=200), nullable=False),
    sa.Column("state", sa.String(length=20), nullable=False),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("name")
    )
    op.create_table("locks",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=False),
    sa.Column("holder", sa.String(length=200), nullable=False),
    sa.Column("reason", sa.String(length=200), nullable=False),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("name")
    )
    op.create_table("plans",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("against_id", sa.Integer(), nullable=False),
    sa.Column("lineage", sa.String(length=36), nullable=False),
    sa.Column("serial", sa.Integer(), nullable=False),
    sa.Column("target", sa.JSON(), nullable=False),
    sa.Column("spec", sa.JSON(), nullable=True),
    sa.Column("diff", sa.JSON(), nullable=False),
    sa.Column("prediction", sa.JSON(), nullable=False),
    sa.Column("text", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["against_id"], ["configurations.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_table("applies",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("plan_id", sa.String(length=36), nullable=True),
    sa.Column("from_id", sa.Integer(), nullable=True),
    sa.Column("to_id", sa.Integer(), nullable=True),
    sa.Column("server_apply_id", sa.String(length=64), nullable=True),
    sa.Column("state", sa.String(length=20), nullable=False),
    sa.Column("outcome", sa.String(length=20), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("holder", sa.String(length=200), nullable=False),
    sa.Column("phases", sa.JSON(), nullable=False),
    sa.Column("bytes_moved", sa.BigInteger(), nullable=False),
    sa.Column("stall_ms", sa.Double(), nullable=True),
    sa.Column("serving", sa.JSON(), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["from_id"], ["configurations.id"], ),
    sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], ),
    sa.ForeignKeyConstraint(["to_id"], ["configurations.id"], ),
    sa.PrimaryKeyConstraint("id")
    )


def downgrade() -> None:
    op.drop_table("applies")
    op.drop_table("plans")
    op.drop_table("locks")
    op.drop_table("devices")
    with op.batch_alter_table("configurations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_configurations_lineage"))

    op.drop_table("configurations")
