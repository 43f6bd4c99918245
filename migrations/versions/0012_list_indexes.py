"""Indexes for every filter of ``GET /api/v1/jobs``, walked newest first.

The list walks one index backwards from its cursor (orchestrix.db.jobs.list_query):
an index whose leading columns are the filters and whose last column is ``id``
gives a page by reading only the rows it returns. 0001 made ``(state, id)`` and
``(type, id)``; the primary key serves the list without filters. This adds:

- ``jobs_queue_id_idx (queue, id)``: ``?queue=`` alone, which walked the whole
  table newest first (or scanned it) looking for the queue's jobs;
- ``jobs_state_queue_id_idx (state, queue, id)``: ``?state=&queue=``;
- ``jobs_state_type_id_idx (state, type, id)``: ``?state=&type=``, and
  ``?state=&type=&queue=``.

``?type=&queue=`` walks ``(type, id)`` and ``?state=&type=&queue=`` walks
``(state, type, id)``, checking the queue on each row they pass: a job type is
almost always sent to one queue, so few rows are passed over. Indexes of their
own for those two would cost every insert and every state change two more index
entries (a state change writes a new entry in every index of the row) for a
rare query.

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
    "jobs_state_queue_id_idx": "(state, queue, id)",
    "jobs_state_type_id_idx": "(state, type, id)",
}


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            op.execute(f"CREATE INDEX CONCURRENTLY {name} ON jobs {columns}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
