"""Leases on running jobs, and cancellation requests for them.

A RUNNING job carries ``lease_expires_at``, renewed by its worker's heartbeats;
once it passes, the rescuer takes the job back. ``cancel_requested_at`` marks a
running job whose worker should stop it.

Revision 0003, after 0002.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE jobs
            ADD COLUMN lease_expires_at timestamptz,
            ADD COLUMN cancel_requested_at timestamptz;

        -- What the rescuer scans: running jobs by lease, and nothing else.
        CREATE INDEX jobs_running_lease_idx ON jobs (lease_expires_at) WHERE state = 'RUNNING';
        -- What the republisher scans: jobs announced but not started, oldest first.
        CREATE INDEX jobs_scheduled_idx ON jobs (scheduled_at) WHERE state = 'SCHEDULED';
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX jobs_scheduled_idx;
        DROP INDEX jobs_running_lease_idx;
        ALTER TABLE jobs DROP COLUMN cancel_requested_at, DROP COLUMN lease_expires_at;
        """
    )
