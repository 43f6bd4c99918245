-- The read-only role KEDA's postgresql scaler logs in as (deploy/k8s/keda):
-- it may read the four columns of `jobs` its query reads (state, run_at,
-- concurrency_key, rate_limit), and nothing else: no payload, no result, no other table,
-- no writes. Run it once, after the first `orchestrix migrate up`, as the
-- owner of the tables (DB_USER) or a superuser, with the password that the
-- orchestrix-keda Secret holds (KEDA_DB_PASSWORD):
--
--   psql "$DATABASE_URL" -v keda_password="$KEDA_DB_PASSWORD" -f deploy/postgres/keda-role.sql
--
-- Running it again sets the password again and grants the same; nothing else.
-- Creating the role needs CREATEROLE; where the owner lacks it, have a DBA run
-- the CREATE/ALTER ROLE statement and the owner the GRANTs.

\set ON_ERROR_STOP on
SELECT format(
    CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orchestrix_keda')
         THEN 'ALTER ROLE orchestrix_keda LOGIN PASSWORD %L'
         ELSE 'CREATE ROLE orchestrix_keda LOGIN PASSWORD %L' END,
    :'keda_password') AS statement \gset
:statement;
ALTER ROLE orchestrix_keda SET default_transaction_read_only = on;
ALTER ROLE orchestrix_keda CONNECTION LIMIT 4;
SELECT format('GRANT CONNECT ON DATABASE %I TO orchestrix_keda', current_database()) AS statement \gset
:statement;
GRANT USAGE ON SCHEMA public TO orchestrix_keda;
GRANT SELECT (state, run_at, concurrency_key, rate_limit) ON jobs TO orchestrix_keda;
