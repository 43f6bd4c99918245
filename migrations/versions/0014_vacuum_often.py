"""Autovacuum for a queue: vacuum ``jobs`` and ``job_events`` after a small share
of their rows changed, at full speed.

Every job is written at least three times (created, RUNNING, its outcome) and
no state change is a HOT update (the state is in indexes and in their
predicates), and retention deletes every finished job: the table turns over
its whole content every retention window. PostgreSQL's defaults vacuum a table
once a fifth of it is dead (``autovacuum_vacuum_scale_factor`` 0.2), throttled
(``autovacuum_vacuum_cost_delay`` 2 ms); by then the heap and every index have
grown by the dead versions, and the space is reused late. Here a vacuum starts
after 1 % of the rows (at least 1,000) are dead or newly inserted, unthrottled:
the table is small (retention bounds it), so each vacuum is short.

The server's ``autovacuum_naptime`` (how often the launcher looks at a
database, 1 minute by default) bounds this too: the embedded server of
``orchestrix dev`` and the benchmark runs with 10 s, and the README recommends it.

Revision 0014, after 0013.
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.01",
    "autovacuum_vacuum_insert_threshold": "1000",
    "autovacuum_vacuum_cost_delay": "0",
}
TABLES = ("jobs", "job_events")


def upgrade() -> None:
    values = ", ".join(f"{name} = {value}" for name, value in SETTINGS.items())
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET ({values})")


def downgrade() -> None:
    names = ", ".join(SETTINGS)
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET ({names})")
