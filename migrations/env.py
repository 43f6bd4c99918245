"""Alembic environment: runs the revisions against the database given in code.

The URL comes from ``config.attributes["database_url"]`` (set by
``orchestrix.migrate``), never from an alembic.ini, so settings stay in one place.
Migrations use psycopg, whose simple-query path lets one revision hold several
SQL statements; the services themselves use asyncpg.
"""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool


def _run(url: str) -> None:
    # libpq parses the URL itself (sslmode and all), so hand SQLAlchemy the
    # connection instead of translating the URL into its dialect form.
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(url), poolclass=pool.NullPool
    )
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
_run(context.config.attributes["database_url"])
