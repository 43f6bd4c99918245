"""Counts of jobs by (queue, type, state) that cost O(rows of the counts) to read.

``GET /api/v1/stats`` counted the whole ``jobs`` table on every call (seconds
at ten million rows). Now:

- ``job_count_deltas``: append-only. Every statement that inserts, updates or
  deletes jobs appends, in the same statement (a statement-level trigger over
  its transition tables), one row per (queue, type, state) whose count it
  changed: +n for the rows that entered it, -n for those that left. A row
  whose state did not change (a lease renewal, a progress write) adds +1 and
  -1 to the same group and appends nothing. Inserts only, no index: concurrent
  writers never wait for each other, unlike a counter row every transaction
  would update (which would serialize the fleet).
- ``job_counts``: the deltas folded, one row per (queue, type, state) with a
  nonzero count. Only the scheduler's ``counter`` (orchestrix.db.counts) writes
  it: one transaction deletes the deltas it sees and adds them here, so a
  delta is folded exactly once, whatever the commit order of the writers (no
  cursor, so no gap between an id's order and its commit's).
- Exact reads: ``job_counts`` plus the deltas not folded yet, in one statement
  (one snapshot), are the counts of that snapshot exactly; the fold only keeps
  the deltas few.

Every path that changes jobs is covered, whatever module wrote the SQL: the
API, the workers, bulk actions, the pruner, tests' factories, psql. TRUNCATE
fires no row or statement trigger: whoever truncates ``jobs`` truncates both
tables too (tests/conftest.py does).

The counts start from the jobs there are: the trigger is created first, and
its lock (SHARE ROW EXCLUSIVE) keeps every writer out until this migration
commits, so the backfill sees no change the trigger would miss or count twice.

Revision 0015, after 0014.
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE job_count_deltas (
            queue text COLLATE "C" NOT NULL,
            type  text COLLATE "C" NOT NULL,
            state text NOT NULL,
            n     bigint NOT NULL
        );
        CREATE TABLE job_counts (
            queue text COLLATE "C" NOT NULL,
            type  text COLLATE "C" NOT NULL,
            state text NOT NULL,
            n     bigint NOT NULL,
            PRIMARY KEY (queue, type, state)
        );

        -- One function for the three triggers: TG_OP says which transition
        -- tables exist. The groups are netted out before anything is written.
        CREATE FUNCTION orchestrix_count_jobs() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO job_count_deltas (queue, type, state, n)
                SELECT queue, type, state, count(*) FROM new_jobs GROUP BY 1, 2, 3;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO job_count_deltas (queue, type, state, n)
                SELECT queue, type, state, -count(*) FROM old_jobs GROUP BY 1, 2, 3;
            ELSE
                INSERT INTO job_count_deltas (queue, type, state, n)
                SELECT queue, type, state, sum(n) FROM (
                    SELECT queue, type, state, 1 AS n FROM new_jobs
                    UNION ALL
                    SELECT queue, type, state, -1 FROM old_jobs
                ) AS moved
                GROUP BY 1, 2, 3
                HAVING sum(n) <> 0;
            END IF;
            RETURN NULL;
        END
        $$;

        CREATE TRIGGER jobs_count_insert
            AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION orchestrix_count_jobs();
        CREATE TRIGGER jobs_count_update
            AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION orchestrix_count_jobs();
        CREATE TRIGGER jobs_count_delete
            AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION orchestrix_count_jobs();

        INSERT INTO job_counts (queue, type, state, n)
        SELECT queue, type, state, count(*) FROM jobs GROUP BY 1, 2, 3;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER jobs_count_delete ON jobs;
        DROP TRIGGER jobs_count_update ON jobs;
        DROP TRIGGER jobs_count_insert ON jobs;
        DROP FUNCTION orchestrix_count_jobs();
        DROP TABLE job_counts;
        DROP TABLE job_count_deltas;
        """
    )
