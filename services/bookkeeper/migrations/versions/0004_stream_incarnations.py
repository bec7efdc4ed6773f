"""the incarnation (creation time) of each stream the audit log follows

Revision ID: 0004
Revises: 0003

A NATS store that was lost or replaced gives EVENTS and CONFIG again from sequence 1, and the log
must not take their events for ones it already has (services/bookkeeper/incarnation.py).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('streams',
                    sa.Column('stream', sa.Text(), nullable=False),
                    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint('stream'))


def downgrade() -> None:
    op.drop_table('streams')
