"""Creates the jobs of single ``POST /api/v1/jobs`` requests, many per statement.

Requests that arrive together have their jobs inserted together: one INSERT and
one commit for all the creates that came in while the loop was busy or the
previous insert was in flight, instead of one each. Each request still gets its
own answer, as if it had been alone: created, or the earlier job of its
idempotency key (also when that earlier job is in the same batch), or its own
error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from orchestrix.batching import Batcher
from orchestrix.db import jobs as db
from orchestrix.models import Job, NewJob

# As many as one POST /api/v1/jobs/batch may hold.
BATCH = 1000

# Errors one row can cause (a value PostgreSQL will not store, a CHECK the API's
# validation missed): they fail the whole statement, but are that row's alone.
ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

Created = tuple[Job, bool]  # the job, and whether this request created it


class Creator:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._batcher: Batcher[NewJob, Created | Exception] = Batcher(self._insert, max_size=BATCH)

    async def create(self, new: NewJob) -> Created:
        """Create ``new``, or return the job its idempotency key already names.

        Raises what inserting this job alone would raise; a database that is away
        fails every request of the batch alike.
        """
        result = await self._batcher.submit(new)
        if isinstance(result, Exception):
            raise result
        return result

    async def _insert(self, batch: Sequence[NewJob]) -> list[Created | Exception]:
        if len(batch) == 1:  # the idle case: the plain single-row insert
            return [await db.insert(self._pool, batch[0])]
        try:
            return list(await db.insert_many(self._pool, batch))
        except ROW_ERRORS:
            pass
        # A row PostgreSQL refused rolled the whole statement back: insert one at
        # a time, so only the request that sent it gets the error. From here each
        # request keeps its own outcome, whatever the error, since rows before it
        # may already be committed.
        results: list[Created | Exception] = []
        for new in batch:
            try:
                results.append(await db.insert(self._pool, new))
            except Exception as exc:
                results.append(exc)
        return results
