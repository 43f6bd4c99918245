"""The worker process: load executors, register, claim and run jobs until stopped.

On SIGTERM or SIGINT: stop fetching, let running jobs finish within
SHUTDOWN_TIMEOUT, hand back the ones that could not, and exit. No job is lost or
marked FAILED by a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from orchestrix import broker, executors
from orchestrix.db import jobs as db
from orchestrix.labels import LabelFollower
from orchestrix.lifecycle import connect_both, stop_on_signals
from orchestrix.metrics import KnownLabels, WorkerMetrics
from orchestrix.services.worker.consumer import Consumer
from orchestrix.settings import Settings
from orchestrix.status import StatusServer, check_dependencies

log = logging.getLogger("worker")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; executors must be loaded (``executors.load``) first."""
    stop = stop_on_signals()
    connected = await connect_both(
        settings, "worker", stop, server_settings=db.CLAIM_SERVER_SETTINGS
    )
    if connected is None:
        return
    pool, nc = connected

    metrics = WorkerMetrics(settings.worker.concurrency, known=KnownLabels(settings.metrics.queues))
    metrics.preset(executors.registry.types(), settings.worker.queues or metrics.known.queues)
    status = StatusServer(
        settings.metrics,
        metrics.registry,
        lambda: check_dependencies(pool, nc),
        stop,
        metrics.dependency_up,
    )
    await status.start()
    consumer = Consumer(pool, nc, settings, executors.registry, metrics)
    log.info(
        "worker started",
        extra={
            "concurrency": settings.worker.concurrency,
            "executors": ",".join(executors.registry.types()),
            "queues": ",".join(settings.worker.queues or ("*",)),
            "worker_id": consumer.id,
        },
    )
    labels_task = asyncio.create_task(LabelFollower(pool, metrics.known).run_forever(stop))
    try:
        await consumer.run(stop)
    finally:
        labels_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await labels_task
        await broker.disconnect(nc)
        await pool.close()
        await status.stop()
        log.info("worker stopped")
