"""Indexes for every filter of ``GET /api/v1/jobs``, walked newest first.

The list walks one index backwards from its cursor (orchestrix.db.jobs.list_query):
an index whose leading columns are the filters and whose last column is ``id``
gives a page by reading only the rows it returns. 0001 made ``(state, id)`` and
``(type, id)``; the primary key serves the list without filters. This adds:

- ``jobs_queue_id_idx (queue, id)``: ``?queue=`` alone, which walked the whole
  table newest first (or scanned it) looking for the queue's jobs.

A filter on the state with a type or a queue walks the type's or the queue's
index, checking the state (and ``?type=&queue=`` walks the type's, checking the
queue: a job type is almost always sent to one queue). Indexes of their own,
``(state, queue, id)`` and ``(state, type, id)``, were tried: every insert and
every state change writes an entry in every index of the row (no update of the
state is HOT), and those two cost the drain of 20,000 jobs about 10 % (2
workers: 8,900 to 9,100 jobs/s with them, 9,900 to 11,200 without, the same
machine, 2026-12-02).

The indexes are built CONCURRENTLY, each outside a transaction, so that creates
and state changes go on while they are built (on a large table, for minutes).
A build that fails leaves an INVALID index behind: drop it, then run the
migration again.

Revision 0012, after 0011.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

INDEXES = {
    "jobs_queue_id_idx": "(queue, id)",
}


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            op.execute(f"CREATE INDEX CONCURRENTLY {name} ON jobs {columns}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
