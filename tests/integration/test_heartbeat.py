"""The heartbeat's lease renewals on a real database: what the fence learns from them."""

from __future__ import annotations

import time

import asyncpg
import nats
from orchestrix.db import jobs as db
from orchestrix.db import workers
from orchestrix.models import NewJob
from orchestrix.settings import Settings

from services.worker.heartbeat import Heartbeat

LEASE_S = 6.0


async def test_a_job_that_ends_while_its_renewal_is_in_flight_is_not_leased_again(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    await db.insert(pool, NewJob(type="t"))
    (job,) = await db.claim(pool, worker_id="w", queues=None, types=["t"], limit=1, lease_s=LEASE_S)
    nc = await nats.connect(list(settings.nats.servers))
    heartbeat = Heartbeat(
        settings.database.url,
        workers.Registration("w", "host", 1, None, ["t"], 1),
        nc,
        lease_s=LEASE_S,
        # The renewal's snapshot still holds the job...
        running=lambda: {job.id: job.attempt},
        on_renewal=lambda _: None,
    )
    heartbeat.leased([job.id], time.monotonic())
    heartbeat.forget(job.id)  # ...which ended before the renewal answered.
    conn = await asyncpg.connect(settings.database.url)
    try:
        await heartbeat._renew(conn)
    finally:
        await conn.close()
        await nc.close()
    # Nothing of it is left for the fence to hold, or to stop.
    assert heartbeat.fenced(time.monotonic() + 10 * LEASE_S) == []
