"""The migration round trip on a database of its own: up, down, up, then the queries run."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from orchestrix import migrate
from orchestrix.db import jobs
from orchestrix.db.pool import init_connection
from orchestrix.devstack import database_url
from orchestrix.models import NewJob

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


async def test_upgrade_downgrade_upgrade(scratch: str) -> None:
    migrate.up(scratch)
    assert await _tables(scratch) == {"jobs", "workers", "alembic_version"}
    migrate.down(scratch, "base")
    assert await _tables(scratch) == {"alembic_version"}
    migrate.up(scratch)
    assert await _tables(scratch) == {"jobs", "workers", "alembic_version"}

    conn = await asyncpg.connect(scratch)
    try:
        await init_connection(conn)
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
        assert [version] == migrate.heads()
        job, created = await jobs.insert(conn, NewJob(type="t", payload={"a": 1}))
        assert created
        assert await jobs.get(conn, job.id) == job
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
