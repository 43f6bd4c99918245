"""Every state change of a job is an event: ``job_events``, written with the change.

Each statement that moves a job from one state to another (and each that
creates one) inserts its events in the same statement, one row per job moved
(orchestrix.db.events): the history of ``GET /api/v1/jobs/{id}/events`` and
the feed of ``GET /api/v1/events``.

- ``from_state`` is NULL for the job's creation; ``attempt`` is the attempt
  the move concerns (the one claimed, or the one that ended); ``actor`` who
  moved it: ``worker:<id>``, ``rescuer:<host:pid>``, ``api:<host:pid>``, ...
- ``xid`` is the writing transaction's id. The live feed reads events in
  (xid, id) order and only below the oldest transaction still running, so
  an event that commits late is never passed over: a reader that resumes
  after (xid, id) misses nothing and sees nothing twice.
- No foreign key to ``jobs``: its check would cost more than the event's
  insert (11 µs against 4 µs a row, measured). Deleting a job deletes its
  events in the same statement (the pruner does; so must anyone else).

Revision 0008, after 0007.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE job_events (
            id         bigint GENERATED ALWAYS AS IDENTITY,
            xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
            job_id     text COLLATE "C" NOT NULL,
            from_state text,
            to_state   text NOT NULL,
            attempt    integer NOT NULL,
            at         timestamptz NOT NULL DEFAULT now(),
            actor      text,
            queue      text NOT NULL,
            type       text NOT NULL,
            PRIMARY KEY (job_id, id)
        );
        -- The live feed's order.
        CREATE INDEX job_events_feed_idx ON job_events (xid, id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE job_events")
