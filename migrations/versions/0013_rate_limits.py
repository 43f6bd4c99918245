"""Rate limits, and a fleet-wide limit on a queue's running jobs.

- ``rate_limits``: named token buckets. A bucket holds at most ``burst``
  tokens and gains ``per_second`` a second; each start of a job that names the
  limit takes one. ``tokens`` and ``refilled_at`` are the bucket as the last
  start that took from it left it; what it holds now is computed from them.
- ``jobs.rate_limit``: the name of the limit a job's starts count against (NULL
  for most jobs). No foreign key: a check on every insert of every job would
  cost the drain; the API refuses a job naming an unknown limit instead, and
  a limit is not deleted while unfinished jobs name it.
- ``queues.running_limit``: at most this many jobs of the queue run at once,
  fleet-wide (NULL: no limit).
- ``jobs_claim_idx`` now holds only jobs with neither a key nor a rate limit
  (the workers' plain claim); jobs with a rate limit and no key have their own
  index, walked by the limited claim (orchestrix.db.concurrency) per limit.

Revision 0013, after 0012.
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rate_limits (
            name        text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
            per_second  double precision NOT NULL CHECK (per_second > 0 AND per_second <= 1000000),
            burst       integer NOT NULL CHECK (burst BETWEEN 1 AND 1000000),
            tokens      double precision NOT NULL,
            refilled_at timestamptz NOT NULL DEFAULT now(),
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE jobs ADD COLUMN rate_limit text CHECK (length(rate_limit) BETWEEN 1 AND 128);
        ALTER TABLE queues
            ADD COLUMN running_limit integer CHECK (running_limit BETWEEN 1 AND 1000000);

        DROP INDEX jobs_claim_idx;
        CREATE INDEX jobs_claim_idx ON jobs (queue, type, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING')
              AND concurrency_key IS NULL AND rate_limit IS NULL;
        CREATE INDEX jobs_rated_claim_idx ON jobs (rate_limit, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING')
              AND concurrency_key IS NULL AND rate_limit IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX jobs_rated_claim_idx;
        DROP INDEX jobs_claim_idx;
        CREATE INDEX jobs_claim_idx ON jobs (queue, type, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NULL;
        ALTER TABLE queues DROP COLUMN running_limit;
        ALTER TABLE jobs DROP COLUMN rate_limit;
        DROP TABLE rate_limits;
        """
    )
