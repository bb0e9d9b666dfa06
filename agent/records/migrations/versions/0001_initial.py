"""records: api_keys, calls, turns, usage_events, audit_log (agent/records/schema.py)

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

#: agent/usage.py USAGE_QUANTITIES as of this revision (a migration never imports the living list)
QUANTITIES = ("caller_audio_s", "agent_audio_s", "stt_audio_s", "llm_prompt_tokens", "llm_completion_tokens",
              "tts_chars")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("record_audio", sa.Boolean, nullable=False),
    )
    op.create_table(
        "calls",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("hangup_cause", sa.String(200), nullable=True),
        sa.Column("record_audio", sa.Boolean, nullable=False),
        sa.Column("recording_path", sa.Text, nullable=True),
        sa.Column("forgotten_at", sa.Float, nullable=True),
    )
    op.create_index("ix_calls_key_id", "calls", ["key_id"])
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_table(
        "turns",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("turn", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("transcript", sa.Text, nullable=True),
        sa.Column("reply", sa.Text, nullable=True),
        sa.Column("ledger", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("stage", sa.String(16), nullable=True),
        sa.Column("purged_at", sa.Float, nullable=True),
    )
    op.create_index("ix_turns_call_turn", "turns", ["call_id", "turn"])
    op.create_index("ix_turns_at", "turns", ["at"])
    op.create_table(
        "usage_events",
        sa.Column("event_id", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("call_id", sa.String(64), nullable=True),
        sa.Column("at", sa.Float, nullable=False),
        *(sa.Column(name, sa.Float, nullable=False) for name in QUANTITIES),
    )
    op.create_index("ix_usage_events_call_id", "usage_events", ["call_id"])
    op.create_index("ix_usage_events_key_at", "usage_events", ["key_id", "at"])
    op.create_index("ix_usage_events_at", "usage_events", ["at"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("call_id", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(200), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_audit_log_call_id", "audit_log", ["call_id"])


def downgrade() -> None:
    for table in ("audit_log", "usage_events", "turns", "calls", "api_keys"):
        op.drop_table(table)
