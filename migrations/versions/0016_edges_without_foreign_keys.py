"""A workflow's edges lose their foreign keys to ``jobs``; the pruner deletes them.

``job_dependencies`` referenced ``jobs`` twice with ``ON DELETE CASCADE``. A
cascade is a row trigger: every deleted job, workflow or not, ran two lookups
in ``job_dependencies`` through SPI. That was more than half of the pruner's
cost, 27 µs a row against 12 without them (PostgreSQL 15, batches of 1,000),
and the CPU it takes comes from the claims and the writes of the workers
running beside it. Each edge insert also ran two key checks on ``jobs``.

Only a workflow's jobs have edges, and they are created with their jobs in
one statement (orchestrix.db.workflows). Nothing but the pruner deletes jobs:
it deletes the edges of the jobs it deletes in the same statement, as it does
their events (``job_events`` has no foreign key for the same reason,
migration 0008), and looks for them only for the jobs that belong to a
workflow.

The downgrade drops edges whose jobs are gone, then adds the keys again.

Revision 0016, after 0015.
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE job_dependencies
            DROP CONSTRAINT job_dependencies_job_id_fkey,
            DROP CONSTRAINT job_dependencies_parent_id_fkey;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DELETE FROM job_dependencies AS d
        WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.job_id)
           OR NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.parent_id);
        ALTER TABLE job_dependencies
            ADD CONSTRAINT job_dependencies_job_id_fkey
                FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE,
            ADD CONSTRAINT job_dependencies_parent_id_fkey
                FOREIGN KEY (parent_id) REFERENCES jobs (id) ON DELETE CASCADE;
        """
    )
