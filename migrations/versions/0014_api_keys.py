"""API keys, and which key created and cancelled each job.

- ``api_keys``: one row per key ``orchestrix keys create`` made. Only the SHA-256
  of the secret is kept (``secret_sha256``, 32 bytes); the secret names the row's
  ``id``, so the API finds a key by primary key. ``scopes`` are among those of
  orchestrix.apikeys (the CHECK mirrors them). A key is never deleted, only
  revoked (``revoked_at``), so its ``name`` stays unique for good: the jobs and
  events that name it keep naming one key. The four limits are the key's own
  (NULL: the API's settings; 0: unlimited).
- ``jobs.created_by_key``, ``jobs.cancelled_by_key``: the name of the key that
  created the job and that cancelled it (or asked its worker to), NULL with
  authentication off or for jobs the scheduler made. Nullable without a default,
  so adding them rewrites no row.

Revision 0014, after 0013.
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_keys (
            id             text COLLATE "C" PRIMARY KEY,
            name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
            scopes         text[] NOT NULL CHECK (
                cardinality(scopes) >= 1
                AND scopes <@ ARRAY['jobs:read', 'jobs:write', 'jobs:cancel',
                                    'metrics:read', 'admin']::text[]
            ),
            secret_sha256  bytea NOT NULL CHECK (length(secret_sha256) = 32),
            created_at     timestamptz NOT NULL DEFAULT now(),
            expires_at     timestamptz,
            revoked_at     timestamptz,
            requests_per_s double precision CHECK (requests_per_s >= 0),
            requests_burst integer CHECK (requests_burst >= 1),
            jobs_per_s     double precision CHECK (jobs_per_s >= 0),
            jobs_burst     integer CHECK (jobs_burst >= 1)
        );
        ALTER TABLE jobs ADD COLUMN created_by_key text, ADD COLUMN cancelled_by_key text;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE jobs DROP COLUMN created_by_key, DROP COLUMN cancelled_by_key;
        DROP TABLE api_keys;
        """
    )
