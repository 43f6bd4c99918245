"""Cron schedules: a table of schedules, and each job knows the tick that made it.

- ``schedules``: a unique name, a cron expression and an IANA time zone, the job
  to create (``job``: type, payload, queue, priority, max_attempts,
  timeout_seconds), what to do with missed ticks, whether ticks may overlap, a
  paused flag, and ``next_tick_at``, the next tick to fire. Every scheduler fires
  due schedules (``FOR UPDATE SKIP LOCKED``), creating the tick's job and moving
  ``next_tick_at`` on in one transaction.
- ``jobs.schedule`` and ``jobs.tick_at``: the schedule and the nominal time of the
  tick a job was created for; unique together, so a tick has at most one job
  whatever happens.

Revision 0006, after 0005. On a large jobs table the unique index takes a
while to build (it holds only scheduled jobs, but reads every row once).
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE schedules (
            name text COLLATE "C" PRIMARY KEY,
            cron text NOT NULL,
            timezone text NOT NULL,
            job jsonb NOT NULL CHECK (jsonb_typeof(job) = 'object'),
            missed text NOT NULL CHECK (missed IN ('skip', 'run_once')),
            catch_up_seconds integer NOT NULL CHECK (catch_up_seconds > 0),
            overlap text NOT NULL CHECK (overlap IN ('allow', 'skip')),
            paused boolean NOT NULL DEFAULT false,
            next_tick_at timestamptz,
            last_tick_at timestamptz,
            last_job_id text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        -- The schedulers' question, several times a second: what is due now?
        CREATE INDEX schedules_due_idx ON schedules (next_tick_at) WHERE NOT paused;

        ALTER TABLE jobs ADD COLUMN schedule text, ADD COLUMN tick_at timestamptz;
        CREATE UNIQUE INDEX jobs_schedule_tick_key ON jobs (schedule, tick_at)
            WHERE schedule IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX jobs_schedule_tick_key;
        ALTER TABLE jobs DROP COLUMN tick_at, DROP COLUMN schedule;
        DROP TABLE schedules;
        """
    )
