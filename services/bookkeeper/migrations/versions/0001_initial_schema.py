"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 03:16:53.243455
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('config_items',
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('item', sa.JSON(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_by', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('last_event_type', sa.Text(), nullable=False),
    sa.Column('last_stream', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'name')
    )
    op.create_table('event_duplicates',
    sa.Column('stream', sa.Text(), nullable=False),
    sa.Column('stream_seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('event_id', sa.Text(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('stream', 'stream_seq')
    )
    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.Text(), nullable=False),
    sa.Column('stream', sa.Text(), nullable=False),
    sa.Column('stream_seq', sa.BigInteger(), nullable=False),
    sa.Column('type', sa.Text(), nullable=False),
    sa.Column('schema_version', sa.Integer(), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.Text(), nullable=False),
    sa.Column('correlation_id', sa.Text(), nullable=True),
    sa.Column('causation_id', sa.Text(), nullable=True),
    sa.Column('study_uid', sa.Text(), nullable=True),
    sa.Column('series_uid', sa.Text(), nullable=True),
    sa.Column('sop_uid', sa.Text(), nullable=True),
    sa.Column('task_id', sa.Text(), nullable=True),
    sa.Column('config_kind', sa.Text(), nullable=True),
    sa.Column('config_name', sa.Text(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id'),
    sa.UniqueConstraint('stream', 'stream_seq', name='uq_events_stream_seq')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_correlation_id', ['correlation_id'], unique=False)
        batch_op.create_index('ix_events_occurred_at', ['occurred_at'], unique=False)
        batch_op.create_index('ix_events_series_uid', ['series_uid'], unique=False)
        batch_op.create_index('ix_events_study_uid', ['study_uid'], unique=False)
        batch_op.create_index('ix_events_task_id', ['task_id'], unique=False)
        batch_op.create_index('ix_events_type', ['type'], unique=False)

    op.create_table('projection_cursors',
    sa.Column('stream', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('stream')
    )
    op.create_table('series',
    sa.Column('series_uid', sa.Text(), nullable=False),
    sa.Column('study_uid', sa.Text(), nullable=True),
    sa.Column('patient_id', sa.Text(), nullable=True),
    sa.Column('patient_name', sa.Text(), nullable=True),
    sa.Column('modality', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('sender', sa.Text(), nullable=True),
    sa.Column('sender_host', sa.Text(), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('first_received', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_received', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('batch_id', sa.Text(), nullable=True),
    sa.Column('tasks_total', sa.Integer(), nullable=False),
    sa.Column('tasks_done', sa.Integer(), nullable=False),
    sa.Column('tasks_failed', sa.Integer(), nullable=False),
    sa.Column('last_event_type', sa.Text(), nullable=False),
    sa.Column('last_event_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_stream', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('series_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_last_received', ['last_received'], unique=False)
        batch_op.create_index('ix_series_status', ['status'], unique=False)
        batch_op.create_index('ix_series_study_uid', ['study_uid'], unique=False)

    op.create_table('services',
    sa.Column('service', sa.Text(), nullable=False),
    sa.Column('state', sa.Text(), nullable=False),
    sa.Column('instance', sa.Text(), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('host', sa.Text(), nullable=True),
    sa.Column('version', sa.Text(), nullable=True),
    sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_stop_reason', sa.Text(), nullable=True),
    sa.Column('last_crashed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_exit_code', sa.Integer(), nullable=True),
    sa.Column('starts', sa.Integer(), nullable=False),
    sa.Column('crashes', sa.Integer(), nullable=False),
    sa.Column('last_event_type', sa.Text(), nullable=False),
    sa.Column('last_stream', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('service')
    )
    op.create_table('tasks',
    sa.Column('task_id', sa.Text(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('series_uid', sa.Text(), nullable=True),
    sa.Column('study_uid', sa.Text(), nullable=True),
    sa.Column('rule', sa.Text(), nullable=True),
    sa.Column('target', sa.Text(), nullable=True),
    sa.Column('priority', sa.Text(), nullable=True),
    sa.Column('state', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_event_type', sa.Text(), nullable=False),
    sa.Column('last_stream', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('task_id')
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_series_uid', ['series_uid'], unique=False)
        batch_op.create_index('ix_tasks_state', ['state'], unique=False)
        batch_op.create_index('ix_tasks_target', ['target'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_target')
        batch_op.drop_index('ix_tasks_state')
        batch_op.drop_index('ix_tasks_series_uid')

    op.drop_table('tasks')
    op.drop_table('services')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_study_uid')
        batch_op.drop_index('ix_series_status')
        batch_op.drop_index('ix_series_last_received')

    op.drop_table('series')
    op.drop_table('projection_cursors')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_type')
        batch_op.drop_index('ix_events_task_id')
        batch_op.drop_index('ix_events_study_uid')
        batch_op.drop_index('ix_events_series_uid')
        batch_op.drop_index('ix_events_occurred_at')
        batch_op.drop_index('ix_events_correlation_id')

    op.drop_table('events')
    op.drop_table('event_duplicates')
    op.drop_table('config_items')
