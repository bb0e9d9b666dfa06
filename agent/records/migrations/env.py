"""Alembic environment for the records database.

sub300 runs it programmatically (`sub300.agent.records.store.upgrade`): the
open connection comes in ``config.attributes["connection"]``.  Run by hand
(``alembic -c alembic.ini -x url=sqlite:///records.db upgrade head``), it
connects to ``-x url=`` or ``sqlalchemy.url``.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from sub300.agent.records.schema import metadata

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")   # SQLite: ALTER via table copies
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("records migrations: no database URL (-x url=... or sqlalchemy.url)")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        with create_engine(url).connect() as conn:
            _run(conn)
