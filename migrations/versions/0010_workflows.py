"""Workflows: groups of jobs created together, where a job waits for its parents.

- ``workflows``: one row per ``POST /api/v1/workflows``.
- ``jobs.workflow_id`` and ``jobs.workflow_key`` (the job's name within the
  request, unique in its workflow); ``job_dependencies`` holds the edges, one
  row per (job, parent), with the parent's side indexed for "whose parent just
  finished".
- A new state, ``WAITING``: a job some of whose parents have not SUCCEEDED.
  ``waiting_for`` counts those parents; the statement that records a parent's
  success takes one off each child and moves a child that reaches 0 to
  PENDING in the same statement (orchestrix.db.jobs).
- A parent that ends FAILED or CANCELLED has its WAITING descendants
  CANCELLED by the schedulers' settler (services/scheduler/settler.py), which
  finds such parents through ``jobs_unsettled_idx`` and sets ``settled`` once
  it has; each descendant's ``cancelled_by`` names the job whose end cancelled
  it, so that an operator's retry of that job brings them back.

Revision 0010, after 0009.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

STATES = "'PENDING', 'WAITING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'RETRYING', 'CANCELLED'"
OLD_STATES = "'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'RETRYING', 'CANCELLED'"


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE workflows (
            id         text COLLATE "C" PRIMARY KEY,
            name       text CHECK (length(name) BETWEEN 1 AND 255),
            created_at timestamptz NOT NULL DEFAULT now()
        );

        ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
        ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ({STATES}));
        ALTER TABLE jobs
            ADD COLUMN workflow_id text COLLATE "C" REFERENCES workflows (id),
            ADD COLUMN workflow_key text CHECK (length(workflow_key) BETWEEN 1 AND 128),
            ADD COLUMN waiting_for integer NOT NULL DEFAULT 0 CHECK (waiting_for >= 0),
            ADD COLUMN cancelled_by text COLLATE "C",
            ADD COLUMN settled boolean NOT NULL DEFAULT false,
            ADD CHECK ((workflow_id IS NULL) = (workflow_key IS NULL)),
            ADD CHECK ((state = 'WAITING') = (waiting_for > 0));

        CREATE UNIQUE INDEX jobs_workflow_key ON jobs (workflow_id, workflow_key)
            WHERE workflow_id IS NOT NULL;
        -- The settler's work: workflow jobs that ended FAILED or CANCELLED and whose
        -- waiting descendants it has not cancelled yet.
        CREATE INDEX jobs_unsettled_idx ON jobs (completed_at)
            WHERE workflow_id IS NOT NULL AND state IN ('FAILED', 'CANCELLED') AND NOT settled;

        CREATE TABLE job_dependencies (
            job_id    text COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            parent_id text COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            PRIMARY KEY (job_id, parent_id),
            CHECK (job_id <> parent_id)
        );
        CREATE INDEX job_dependencies_parent_idx ON job_dependencies (parent_id);

        -- The event stream filters by workflow too (GET /api/v1/events?workflow_id=).
        ALTER TABLE job_events ADD COLUMN workflow_id text COLLATE "C";
        """
    )


def downgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE job_events DROP COLUMN workflow_id;
        DROP TABLE job_dependencies;
        UPDATE jobs SET state = 'CANCELLED', completed_at = now(), waiting_for = 0
            WHERE state = 'WAITING';
        ALTER TABLE jobs
            DROP COLUMN settled, DROP COLUMN cancelled_by, DROP COLUMN waiting_for,
            DROP COLUMN workflow_key, DROP COLUMN workflow_id;
        ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
        ALTER TABLE jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ({OLD_STATES}));
        DROP TABLE workflows;
        """
    )
