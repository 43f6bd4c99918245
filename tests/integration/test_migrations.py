"""The migration round trip on a database of its own: up, down, up, then the queries run."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from orchestrix import migrate
from orchestrix.db import counts, jobs, retention, workers
from orchestrix.db.pool import init_connection
from orchestrix.devstack import database_url
from orchestrix.models import NewJob
from orchestrix.states import JobState

from tests.conftest import RUN_ID, Servers


@pytest.fixture
async def scratch(servers: Servers) -> AsyncIterator[str]:
    name = f"orx_test_{RUN_ID}_migrations"
    admin = await asyncpg.connect(servers.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield database_url(servers.admin_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


TABLES = {
    "jobs",
    "job_events",
    "job_dependencies",
    "workflows",
    "workers",
    "queues",
    "schedules",
    "rate_limits",
    "api_keys",
    "job_counts",
    "job_count_deltas",
    "alembic_version",
}


async def test_upgrade_downgrade_upgrade(scratch: str) -> None:
    migrate.up(scratch)
    assert await _tables(scratch) == TABLES
    migrate.down(scratch, "base")
    assert await _tables(scratch) == {"alembic_version"}
    migrate.up(scratch)
    assert await _tables(scratch) == TABLES

    conn = await asyncpg.connect(scratch)
    try:
        await init_connection(conn)
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
        assert [version] == migrate.heads()
        job, created = await jobs.insert(conn, NewJob(type="t", payload={"a": 1}))
        assert created
        assert await jobs.get(conn, job.id) == job
        [claimed] = await jobs.claim(
            conn, worker_id="w", queues=None, types=["t"], limit=10, lease_s=30
        )
        assert await jobs.succeed(conn, claimed.id, claimed.attempt, {"ok": True}) is not None
        assert await retention.prune(conn, JobState.SUCCEEDED, 1e-6, 10) == 1
        await workers.register(
            conn, workers.Registration("w", "host", 1, None, ["t"], concurrency=1)
        )
        assert await workers.beat(conn, "w")
    finally:
        await conn.close()


async def _indexes(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'")
    return {row["indexname"] for row in rows}


async def test_0004_returns_scheduled_jobs_to_pending_uncounted(scratch: str) -> None:
    migrate.up(scratch, "0003")
    conn = await asyncpg.connect(scratch)
    try:
        await init_connection(conn)
        # What the previous version left: jobs claimed and published (SCHEDULED)
        # for their first and their second attempt, and one running.
        await conn.execute(
            """
            INSERT INTO jobs (id, type, state, attempt, scheduled_at, started_at,
                              lease_expires_at)
            VALUES ('01AAAAAAAAAAAAAAAAAAAAAAA1', 't', 'SCHEDULED', 1, now(), NULL, NULL),
                   ('01AAAAAAAAAAAAAAAAAAAAAAA2', 't', 'SCHEDULED', 2, now(), NULL, NULL),
                   ('01AAAAAAAAAAAAAAAAAAAAAAA3', 't', 'RUNNING', 1, now(), now(),
                    now() + interval '30 seconds')
            """
        )
        assert "jobs_due_idx" in await _indexes(conn)
        migrate.up(scratch, "0004")
        rows = await conn.fetch("SELECT * FROM jobs ORDER BY id")
        assert [(r["state"], r["attempt"], r["scheduled_at"]) for r in rows[:2]] == [
            ("PENDING", 0, None),
            ("PENDING", 1, None),
        ]
        assert (rows[2]["state"], rows[2]["attempt"], rows[2]["worker_id"]) == ("RUNNING", 1, None)
        assert [r["handoffs"] for r in rows] == [0, 0, 0]
        indexes = await _indexes(conn)
        assert {"jobs_claim_idx", "jobs_running_worker_idx"} <= indexes
        assert not {"jobs_due_idx", "jobs_scheduled_idx"} & indexes
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE jobs SET state = 'SCHEDULED' WHERE id = $1", rows[0]["id"])

        # Claimed again (by today's claim, on today's schema), the attempt counted
        # once more: 1 and 2, as before 0004.
        migrate.up(scratch)
        claimed = await jobs.claim(
            conn, worker_id="w", queues=None, types=["t"], limit=10, lease_s=30
        )
        assert sorted((job.id, job.attempt) for job in claimed) == [
            ("01AAAAAAAAAAAAAAAAAAAAAAA1", 1),
            ("01AAAAAAAAAAAAAAAAAAAAAAA2", 2),
        ]

        migrate.down(scratch, "0003")
        assert await _tables(scratch) == {"jobs", "alembic_version"}
        assert {"jobs_due_idx", "jobs_scheduled_idx"} <= await _indexes(conn)
        migrate.up(scratch)
        assert await _tables(scratch) == TABLES
    finally:
        await conn.close()


async def test_check_constraints_mirror_the_state_machine(scratch: str) -> None:
    migrate.up(scratch)
    conn = await asyncpg.connect(scratch)
    try:
        await init_connection(conn)
        job, _ = await jobs.insert(conn, NewJob(type="t"))
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE jobs SET state = 'LOST' WHERE id = $1", job.id)
        # A terminal state without a completion time is refused too.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE jobs SET state = 'SUCCEEDED' WHERE id = $1", job.id)
    finally:
        await conn.close()


async def test_0015_counts_the_jobs_already_there(scratch: str) -> None:
    migrate.up(scratch, "0014")
    conn = await asyncpg.connect(scratch)
    try:
        await init_connection(conn)
        await conn.execute(
            """
            INSERT INTO jobs (id, type, queue, state, attempt, started_at, lease_expires_at)
            VALUES ('01AAAAAAAAAAAAAAAAAAAAAAA1', 't', 'a', 'PENDING', 0, NULL, NULL),
                   ('01AAAAAAAAAAAAAAAAAAAAAAA2', 't', 'a', 'PENDING', 0, NULL, NULL),
                   ('01AAAAAAAAAAAAAAAAAAAAAAA3', 'u', 'b', 'RUNNING', 1, now(),
                    now() + interval '30 seconds')
            """
        )
        migrate.up(scratch)
        rows = await conn.fetch("SELECT queue, type, state, n FROM job_counts ORDER BY 1")
        assert [tuple(row) for row in rows] == [("a", "t", "PENDING", 2), ("b", "u", "RUNNING", 1)]
        await jobs.insert(conn, NewJob(type="t", queue="a"))
        read = await counts.read(conn)
        assert (read.by_state[JobState.PENDING], read.by_state[JobState.RUNNING]) == (3, 1)
        assert read.waiting == [("a", "t", 3)]
        migrate.down(scratch, "0014")
        assert "job_counts" not in await _tables(scratch)
        await jobs.insert(conn, NewJob(type="t", queue="a"))  # no trigger left behind
    finally:
        await conn.close()


async def test_0017_deletes_the_workflows_retention_had_emptied(scratch: str) -> None:
    migrate.up(scratch, "0016")
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute(
            """
            INSERT INTO workflows (id) VALUES ('01AAAAAAAAAAAAAAAAAAAAAAW1'),
                                              ('01AAAAAAAAAAAAAAAAAAAAAAW2');
            INSERT INTO jobs (id, type, workflow_id, workflow_key)
            VALUES ('01AAAAAAAAAAAAAAAAAAAAAAA1', 't', '01AAAAAAAAAAAAAAAAAAAAAAW2', 'a');
            """
        )
        migrate.up(scratch)
        kept = await conn.fetch("SELECT id FROM workflows")
        assert [row["id"] for row in kept] == ["01AAAAAAAAAAAAAAAAAAAAAAW2"]
        migrate.down(scratch, "0016")
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO jobs (id, type, workflow_id, workflow_key)"
                " VALUES ('01AAAAAAAAAAAAAAAAAAAAAAA2', 't', '01AAAAAAAAAAAAAAAAAAAAAAW9', 'a')"
            )
    finally:
        await conn.close()


def test_create_numbers_revisions_after_the_newest(tmp_path: Path) -> None:
    # A copy, so a concurrent run never sees the new revision.
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, directory)
    newest = int(max(migrate.heads(directory)))
    path = migrate.create("add_example_column", directory)
    assert path.name == f"{newest + 1:04d}_add_example_column.py"
    assert migrate.heads(directory) == [f"{newest + 1:04d}"]
    text = path.read_text()
    assert "def upgrade() -> None:" in text
    assert f"down_revision = '{newest:04d}'" in text
    with pytest.raises(ValueError, match="lowercase letters"):
        migrate.create("Bad Name", directory)
