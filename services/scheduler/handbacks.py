"""Applies the hand-back ledger: attempts returned by workers that had to exit while
PostgreSQL was away (``orchestrix.handbacks``).

Run by the maintenance leader before the lifeline and the rescuer, so that an
attempt its worker returned is handed back (not counted) instead of rescued as
lost (counted). An entry is acknowledged once its hand-back is committed, or
found moot (the job had moved on); while the database is away it stays in the
stream and the next round tries again.
"""

from __future__ import annotations

import logging
from typing import Any

from nats import errors as nats_errors
from nats.js import JetStreamContext
from orchestrix import handbacks
from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
BATCH = 100
FETCH_WAIT_S = 0.1


class HandBackApplier:
    def __init__(
        self, pool: Any, js: JetStreamContext, nats: NatsSettings, metrics: SchedulerMetrics
    ) -> None:
        self._pool = pool
        self._js = js
        self._nats = nats
        self._metrics = metrics
        self._subscription: Any = None

    async def run_once(self) -> int:
        """Apply what the ledger holds; the number of jobs handed back."""
        if self._subscription is None:
            await handbacks.ensure_stream(self._js, self._nats)
            self._subscription = await self._js.pull_subscribe(
                handbacks.subject(self._nats),
                durable=handbacks.consumer_name(self._nats),
                stream=handbacks.stream_name(self._nats),
            )
        try:
            messages = await self._subscription.fetch(BATCH, timeout=FETCH_WAIT_S)
        except nats_errors.TimeoutError:
            return 0
        applied = 0
        for message in messages:
            try:
                entry = handbacks.HandBack.decode(message.data)
            except ValueError as exc:
                log.error("undecodable hand-back dropped", extra={"error": str(exc)})
                await message.term()
                continue
            # A database error propagates: the entry is redelivered, tried again.
            state = await db.hand_back(
                self._pool, entry.job_id, entry.attempt, worker_id=entry.worker_id
            )
            await message.ack()
            if state is not None:
                applied += 1
                self._metrics.handbacks_applied.inc()
                log.warning(
                    "hand-back from the ledger applied",
                    extra={
                        "job_id": entry.job_id,
                        "attempt": entry.attempt,
                        "worker_id": entry.worker_id,
                        "state": state.value,
                    },
                )
            else:
                log.info(
                    "ledger hand-back moot: the job had moved on", extra={"job_id": entry.job_id}
                )
        return applied
