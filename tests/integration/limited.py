"""A limited claim caught between its turns and its commit, for the tests of
what a second claim may do meanwhile."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import asyncpg
from orchestrix.db import concurrency
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.models import Job


@contextlib.asynccontextmanager
async def holding(database: str, types: Sequence[str], limit: int) -> AsyncIterator[list[Job]]:
    """A claim of ``limit`` jobs of ``types`` that has taken its turns and moved its
    jobs, and commits when the block ends; yields its jobs."""
    conn = await asyncpg.connect(database, server_settings=db.CLAIM_SERVER_SETTINGS)
    try:
        await init_connection(conn)
        async with conn.transaction():
            turns = await conn.fetchrow(concurrency._TAKE_TURNS, None, list(types), limit, "", "")
            rows = await conn.fetch(
                concurrency._CLAIM_LIMITED,
                None,
                list(types),
                limit,
                "holder",
                30.0,
                turns["key_queues"],
                turns["keys"],
                turns["queues"],
                turns["buckets"],
            )
            yield [Job.from_row(row) for row in rows]
    finally:
        await conn.close()
