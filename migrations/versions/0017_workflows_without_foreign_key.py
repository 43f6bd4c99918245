"""``jobs.workflow_id`` loses its foreign key; the pruner deletes a workflow's row
with its last job.

The key was checked by a row trigger: each of a workflow's jobs ran a lookup
of ``workflows`` through SPI at insert. Writing a 1,000-job workflow (jobs,
events and edges, PostgreSQL 15, 16 runs each) took 33.6-35.9 ms with it and
30.0-32.5 without. And nothing deleted a ``workflows`` row: the table grew by
one row per workflow forever, after retention had deleted every job.

A workflow's jobs are created with its row in one transaction
(orchestrix.db.workflows) and never added to later; nothing but the pruner
deletes jobs. The pruner now deletes the row of a workflow in the statement
that deletes its last job (orchestrix.db.retention), as it deletes the jobs'
events and edges (migrations 0008 and 0016).

The upgrade deletes the rows of workflows that have no job left (those the
pruner emptied before); the downgrade adds the key again.

Revision 0017, after 0016.
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE jobs DROP CONSTRAINT jobs_workflow_id_fkey;
        DELETE FROM workflows AS w
        WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.workflow_id = w.id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE jobs
            ADD CONSTRAINT jobs_workflow_id_fkey
                FOREIGN KEY (workflow_id) REFERENCES workflows (id);
        """
    )
