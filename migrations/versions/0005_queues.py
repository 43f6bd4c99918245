"""Queues have a row of their own: a paused queue's jobs are not claimed.

A queue exists as soon as a job names it; it gets a row here the first time it
is paused (``POST /api/v1/queues/{queue}/pause``). ``paused_at`` is set while
it is paused. Workers read it in every claim, so a pause holds fleet-wide from
the next claim on; the jobs already running finish. Resuming clears it and
notifies the workers (the same ``orchestrix_jobs`` channel new jobs use), so the
queue's waiting jobs start at once.

Revision 0005, after 0004.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE queues (
            name text PRIMARY KEY,
            paused_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE queues")
