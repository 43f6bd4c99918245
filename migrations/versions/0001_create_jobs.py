"""Create the jobs table: the record of every job and its state.

Revision 0001, the first.
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE jobs (
            -- ULID, Crockford base32: sorts by creation time under the C collation.
            id              text COLLATE "C" PRIMARY KEY
                            CHECK (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
            type            text NOT NULL CHECK (length(type) BETWEEN 1 AND 128),
            queue           text NOT NULL DEFAULT 'default'
                            CHECK (length(queue) BETWEEN 1 AND 64),
            payload         jsonb NOT NULL DEFAULT '{}'
                            CHECK (jsonb_typeof(payload) = 'object'),
            -- The seven states of orchestrix.states.JobState.
            state           text NOT NULL DEFAULT 'PENDING'
                            CHECK (state IN ('PENDING', 'SCHEDULED', 'RUNNING', 'SUCCEEDED',
                                             'FAILED', 'RETRYING', 'CANCELLED')),
            priority        integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
            -- The attempt running or last run; 0 until the first one is scheduled.
            attempt         integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
            max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
            run_at          timestamptz NOT NULL DEFAULT now(),
            timeout_seconds integer NOT NULL DEFAULT 300
                            CHECK (timeout_seconds BETWEEN 1 AND 604800),
            idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
            last_error      text,
            -- One {"attempt", "error", "at"} object per failed attempt.
            errors          jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(errors) = 'array'),
            result          jsonb,
            created_at      timestamptz NOT NULL DEFAULT now(),
            scheduled_at    timestamptz,
            started_at      timestamptz,
            completed_at    timestamptz,
            updated_at      timestamptz NOT NULL DEFAULT now(),
            CHECK (attempt <= max_attempts),
            -- Terminal states carry their completion time, and only they do.
            CHECK ((state IN ('SUCCEEDED', 'FAILED', 'CANCELLED')) = (completed_at IS NOT NULL))
        );

        CREATE UNIQUE INDEX jobs_idempotency_key_key ON jobs (idempotency_key)
            WHERE idempotency_key IS NOT NULL;

        -- The claim query's index: it holds only waiting jobs, so its size and the
        -- cost of a claim do not grow with the number of finished jobs.
        CREATE INDEX jobs_due_idx ON jobs (priority DESC, run_at, id)
            WHERE state IN ('PENDING', 'RETRYING');

        -- Listing newest first, filtered by state or type.
        CREATE INDEX jobs_state_id_idx ON jobs (state, id);
        CREATE INDEX jobs_type_id_idx ON jobs (type, id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE jobs")
