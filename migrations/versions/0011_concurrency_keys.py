"""Concurrency keys: at most a queue's ``key_limit`` jobs of one key run at once.

- ``jobs.concurrency_key``: set at creation (a customer id, say); NULL for most jobs.
- ``queues.key_limit``: how many jobs of one key of the queue may run at once,
  fleet-wide (NULL: 1).
- ``jobs_claim_idx`` now holds only jobs without a key: the workers' plain
  claim never sees a keyed job. Keyed jobs have their own index, walked by the
  keyed claim (orchestrix.db.concurrency) per (queue, key), and the running
  ones one more, by which that claim counts what each key runs.

Revision 0011, after 0010.
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE jobs
            ADD COLUMN concurrency_key text CHECK (length(concurrency_key) BETWEEN 1 AND 255);
        ALTER TABLE queues
            ADD COLUMN key_limit integer CHECK (key_limit BETWEEN 1 AND 100000);

        DROP INDEX jobs_claim_idx;
        CREATE INDEX jobs_claim_idx ON jobs (queue, type, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NULL;
        CREATE INDEX jobs_keyed_claim_idx
            ON jobs (queue, concurrency_key, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING') AND concurrency_key IS NOT NULL;
        CREATE INDEX jobs_running_key_idx ON jobs (queue, concurrency_key)
            WHERE state = 'RUNNING' AND concurrency_key IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX jobs_running_key_idx;
        DROP INDEX jobs_keyed_claim_idx;
        DROP INDEX jobs_claim_idx;
        CREATE INDEX jobs_claim_idx ON jobs (queue, type, priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING');
        ALTER TABLE queues DROP COLUMN key_limit;
        ALTER TABLE jobs DROP COLUMN concurrency_key;
        """
    )
