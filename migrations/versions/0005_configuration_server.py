"""A configuration's server: the admin URL of the deployment it was observed or applied at, so
that a store stays the history of one deployment (a refresh from another server is refused, or
recorded as the deployment having moved when the old address no longer answers); and its note,
which says when it was recorded because the deployment moved. Configurations recorded before
have neither; the first refresh from a server adopts its address.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("configurations") as batch:
        batch.add_column(sa.Column("server", sa.String(length=500), nullable=True))
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("configurations") as batch:
        batch.drop_column("note")
        batch.drop_column("server")
