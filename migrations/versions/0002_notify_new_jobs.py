"""Notify schedulers when jobs are inserted, so they wake at once instead of polling.

Revision 0002, after 0001.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- One notification per inserting statement, whatever its row count:
        -- a bulk insert wakes the schedulers once.
        CREATE FUNCTION orchestrix_notify_jobs() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('orchestrix_jobs', '');
            RETURN NULL;
        END
        $$;

        CREATE TRIGGER jobs_notify_insert
            AFTER INSERT ON jobs
            FOR EACH STATEMENT EXECUTE FUNCTION orchestrix_notify_jobs();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER jobs_notify_insert ON jobs;
        DROP FUNCTION orchestrix_notify_jobs();
        """
    )
