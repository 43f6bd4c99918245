"""The worker process: load executors, join the shared consumer, run jobs until stopped.

On SIGTERM or SIGINT: stop fetching, let running jobs finish within
SHUTDOWN_TIMEOUT, hand back the ones that could not, and exit. No job is lost or
marked FAILED by a shutdown.
"""

from __future__ import annotations

import logging

from orchestrix import broker, executors
from orchestrix.lifecycle import connect_both, stop_on_signals
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import DEFAULT_QUEUE
from orchestrix.settings import Settings
from orchestrix.status import StatusServer, check_dependencies

from services.worker.consumer import Consumer

log = logging.getLogger("worker")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; executors must be loaded (``executors.load``) first."""
    stop = stop_on_signals()
    connected = await connect_both(settings, "orchestrix-worker", stop)
    if connected is None:
        return
    pool, nc = connected
    js = nc.jetstream()
    if not await broker.ensure_with_backoff(
        lambda: broker.ensure_consumer(js, settings.nats), "jetstream consumer", stop
    ):
        await nc.close()
        await pool.close()
        return

    metrics = WorkerMetrics(settings.worker.concurrency)
    metrics.preset(executors.registry.types(), (DEFAULT_QUEUE,))
    status = StatusServer(
        settings.metrics, metrics.registry, lambda: check_dependencies(pool, nc), stop
    )
    await status.start()
    consumer = Consumer(pool, nc, settings, executors.registry, metrics)
    log.info(
        "worker started",
        extra={
            "concurrency": settings.worker.concurrency,
            "executors": ",".join(executors.registry.types()),
            "consumer": settings.nats.consumer,
        },
    )
    try:
        await consumer.run(stop)
    finally:
        await nc.drain()
        await pool.close()
        await status.stop()
        log.info("worker stopped")
