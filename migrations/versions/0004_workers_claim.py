"""Workers claim their own jobs: the SCHEDULED state goes, workers are registered.

A worker with free slots moves due jobs straight from PENDING or RETRYING to
RUNNING, so the decision which job runs next is taken when a slot is free: by
priority within a queue, round robin across queues, only for the queues and
types that worker serves. Nothing is announced ahead of capacity, so the
SCHEDULED state (claimed, waiting in the NATS stream) has no use any more; jobs
left in it by the previous version go back to PENDING, their attempt not counted.

- ``jobs_claim_idx`` replaces ``jobs_due_idx``: a claim walks it per
  (queue, type), in priority order.
- ``jobs.worker_id`` names the worker running (or that last ran) the attempt.
- ``jobs.handoffs`` counts hand-backs in a row: past a limit they count as a
  failed attempt, so a job that never fits in a shutdown grace period is not
  handed back forever.
- ``workers`` holds each live worker process: what it serves, and the
  PostgreSQL session that dies with it (its liveness).

Revision 0004, after 0003.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        UPDATE jobs
        SET state = 'PENDING', attempt = GREATEST(attempt - 1, 0), scheduled_at = NULL,
            updated_at = now()
        WHERE state = 'SCHEDULED';

        ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
        -- The six states of orchestrix.states.JobState.
        ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
            CHECK (state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'RETRYING',
                             'CANCELLED'));

        ALTER TABLE jobs
            ADD COLUMN worker_id text,
            ADD COLUMN handoffs integer NOT NULL DEFAULT 0 CHECK (handoffs >= 0);

        DROP INDEX jobs_scheduled_idx;
        DROP INDEX jobs_due_idx;
        -- A claim finds the (queue, type) pairs with waiting jobs by skipping
        -- through this index, then walks each pair it serves in priority order.
        CREATE INDEX jobs_claim_idx ON jobs (queue, type, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING');
        -- The lifeline finds a dead worker's jobs.
        CREATE INDEX jobs_running_worker_idx ON jobs (worker_id) WHERE state = 'RUNNING';

        CREATE TABLE workers (
            id            text COLLATE "C" PRIMARY KEY,
            hostname      text NOT NULL,
            pid           integer NOT NULL,
            -- NULL: every queue.
            queues        text[],
            types         text[] NOT NULL,
            concurrency   integer NOT NULL CHECK (concurrency > 0),
            -- The worker's heartbeat session: while it lives, so does the worker.
            backend_pid   integer NOT NULL,
            backend_start timestamptz NOT NULL,
            started_at    timestamptz NOT NULL DEFAULT now(),
            seen_at       timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE workers;
        DROP INDEX jobs_running_worker_idx;
        DROP INDEX jobs_claim_idx;
        ALTER TABLE jobs DROP COLUMN handoffs, DROP COLUMN worker_id;
        ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
        ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
            CHECK (state IN ('PENDING', 'SCHEDULED', 'RUNNING', 'SUCCEEDED', 'FAILED',
                             'RETRYING', 'CANCELLED'));
        CREATE INDEX jobs_due_idx ON jobs (priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING');
        CREATE INDEX jobs_scheduled_idx ON jobs (scheduled_at) WHERE state = 'SCHEDULED';
        """
    )
