"""A limited claim caught between its turn and its commit, for the tests of what
a second claim does meanwhile (it must wait for the turn)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

import asyncpg
from orchestrix.db import concurrency
from orchestrix.db import jobs as db
from orchestrix.db.pool import init_connection
from orchestrix.models import Job

T = TypeVar("T")


@contextlib.asynccontextmanager
async def holding(database: str, types: Sequence[str], limit: int) -> AsyncIterator[list[Job]]:
    """A claim of ``limit`` jobs of ``types`` that has taken the turn and moved its
    jobs, and commits when the block ends; yields its jobs."""
    conn = await asyncpg.connect(database, server_settings=db.CLAIM_SERVER_SETTINGS)
    try:
        await init_connection(conn)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", concurrency.KEYED_LOCK)
            rows = await conn.fetch(
                concurrency._CLAIM_LIMITED, None, list(types), limit, "holder", 30.0, "", ""
            )
            yield [Job.from_row(row) for row in rows]
    finally:
        await conn.close()


async def waits_for_the_turn(database: str, types: Sequence[str], claim: Awaitable[T]) -> T:
    """``claim``'s answer, started while another claim holds the turn: it must not
    answer before that claim commits."""
    async with holding(database, types, 2) as first:
        assert len(first) == 2
        second = asyncio.ensure_future(claim)
        await asyncio.sleep(0.3)
        assert not second.done(), "a second limited claim did not wait for the turn"
    return await asyncio.wait_for(second, 5)
