"""Retention: an index on finished jobs by state and completion time, for the pruner.

The leading scheduler deletes finished jobs once their state's retention has
passed since ``completed_at`` (services/scheduler/pruner.py). Each batch takes
the oldest of one state, so it needs them in that order: this index holds only
finished jobs (claims never read it, and the claim index never holds them), and
its first column is the state the pruner's statements name as a literal.

Revision 0009, after 0008. On a large jobs table the index takes a while to
build (it reads every row once).
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX jobs_finished_idx ON jobs (state, completed_at)
            WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX jobs_finished_idx")
