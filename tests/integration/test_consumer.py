"""The worker's main loop in this process, on real servers: what stops a job, and what must not."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import asyncpg
import nats
import pytest
from orchestrix.db import jobs as db
from orchestrix.executors import JobContext, Registry
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import NewJob
from orchestrix.settings import Settings

from services.worker.consumer import Consumer, Phase
from tests.conftest import RUN_ID


async def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_lost_lease_reported_while_the_success_is_being_written_stops_nothing(
    pool: asyncpg.Pool, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault 9: a renewal whose snapshot still holds a job finds it no longer
    # RUNNING when that job's batched success commits first, and reports it lost
    # while the worker is still recording the outcome. The success must stand and
    # count once; nothing may cancel the write.
    nats_settings = dataclasses.replace(settings.nats, subject_prefix=f"orxtest.c{RUN_ID}.jobs")
    settings = dataclasses.replace(settings, nats=nats_settings)
    release = asyncio.Event()

    async def held(ctx: JobContext) -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    registry = Registry()
    registry.register("held", held)
    metrics = WorkerMetrics(settings.worker.concurrency)
    nc = await nats.connect(list(settings.nats.servers))
    consumer = Consumer(pool, nc, settings, registry, metrics)
    stop = asyncio.Event()
    job, _ = await db.insert(pool, NewJob(type="held"))
    loop = asyncio.create_task(consumer.run(stop))
    lock = await asyncpg.connect(settings.database.url)
    try:
        await _until(lambda: job.id in consumer._running, 10, "the job to be claimed")
        running = consumer._running[job.id]
        # Hold the success write: the job's row is locked until we say.
        transaction = lock.transaction()
        await transaction.start()
        await lock.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job.id)
        release.set()
        await _until(lambda: running.phase is Phase.RECORDING, 5, "the outcome to be written")
        await asyncio.sleep(0.2)  # the batched UPDATE is at the server, waiting for the row

        consumer._apply(db.Renewal(cancel=set(), lost={job.id}))
        await transaction.rollback()
        await _until(lambda: job.id not in consumer._running, 10, "the outcome to be recorded")

        assert not running.task.cancelled()
        row = await pool.fetchrow("SELECT state, result, attempt FROM jobs WHERE id = $1", job.id)
        assert (row["state"], row["attempt"]) == ("SUCCEEDED", 1)
        succeeded = metrics.registry.get_sample_value(
            "orchestrix_jobs_succeeded_total", {"type": "held", "queue": "default"}
        )
        assert succeeded == 1
        assert "abandoned" not in caplog.text
    finally:
        stop.set()
        release.set()
        await asyncio.wait_for(loop, 30)
        await lock.close()
        await nc.close()
