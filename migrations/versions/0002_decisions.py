"""The controller's decisions: every one, acting or not, with its reason and predicted figures.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("decisions",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("serial", sa.Integer(), nullable=False),
    sa.Column("holder", sa.String(length=200), nullable=False),
    sa.Column("mode", sa.String(length=20), nullable=False),
    sa.Column("act", sa.Boolean(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("current", sa.JSON(), nullable=False),
    sa.Column("target", sa.JSON(), nullable=False),
    sa.Column("predicted", sa.JSON(), nullable=False),
    sa.Column("workload", sa.JSON(), nullable=False),
    sa.Column("plan_id", sa.String(length=36), nullable=True),
    sa.Column("server_apply_id", sa.String(length=64), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], ),
    sa.PrimaryKeyConstraint("id")
    )


def downgrade() -> None:
    op.drop_table("decisions")
