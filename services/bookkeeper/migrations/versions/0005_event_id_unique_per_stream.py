"""event ids unique per stream, not overall

Revision ID: 0005
Revises: 0004

After a NATS store loss the rows of the earlier incarnation are kept as stream `EVENTS~<created>`
(migration 0004); the new incarnation's router derives batch, task and decision ids from the new
stream's sequences, which may repeat ids of the archived rows. With event_id unique overall those
events were recorded as duplicates and missing from the log and its views.
"""
from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# The name SQLite's unnamed constraint of migration 0001 is given for batch mode to find it; on
# Postgres it is the server's default name.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint('events_event_id_key', 'events', type_='unique')
        op.create_unique_constraint('uq_events_stream_event_id', 'events', ['stream', 'event_id'])
        return
    with op.batch_alter_table('events', naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint('uq_events_event_id', type_='unique')
        batch_op.create_unique_constraint('uq_events_stream_event_id', ['stream', 'event_id'])


def downgrade() -> None:
    # (Fails if an archived incarnation repeats an event id of another stream: they cannot both stay.)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint('uq_events_stream_event_id', 'events', type_='unique')
        op.create_unique_constraint('events_event_id_key', 'events', ['event_id'])
        return
    with op.batch_alter_table('events', naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint('uq_events_stream_event_id', type_='unique')
        batch_op.create_unique_constraint('uq_events_event_id', ['event_id'])
