"""Executors report progress: the latest report of the running attempt, and when.

``jobs.progress`` holds the JSON value an executor last passed to
``job.progress(...)``, written by its worker at most once a second while the
attempt runs; ``progress_at`` is when that write happened. Both stay as they
were when the job ends, and a new attempt starts from the previous one's last
report.

Revision 0007, after 0006.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs ADD COLUMN progress jsonb, ADD COLUMN progress_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN progress_at, DROP COLUMN progress")
