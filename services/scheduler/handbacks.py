"""Applies the hand-back ledger: attempts returned by workers that had to exit while
PostgreSQL was away (``orchestrix.handbacks``).

Run by the maintenance leader before the lifeline and the rescuer, so that an
attempt its worker returned is handed back (not counted) instead of rescued as
lost (counted). An entry is acknowledged once its hand-back is committed, or
found moot (the job had moved on); while the database is away it stays in the
stream and the next round tries again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from nats import errors as nats_errors
from nats.js import JetStreamContext
from orchestrix import handbacks
from orchestrix.db import jobs as db
from orchestrix.metrics import SchedulerMetrics
from orchestrix.settings import NatsSettings

log = logging.getLogger("scheduler")
BATCH = 100
# Batches one round applies at most (then the lifeline and the rescuer run).
ROUNDS = 20
FETCH_WAIT_S = 0.1
# After the stream could not be made (JetStream off?), try again this much later.
RETRY_STREAM_S = 30.0


class HandBackApplier:
    def __init__(
        self, pool: Any, js: JetStreamContext, nats: NatsSettings, metrics: SchedulerMetrics
    ) -> None:
        self._pool = pool
        self._js = js
        self._nats = nats
        self._metrics = metrics
        self._subscription: Any = None
        self._failed_at = float("-inf")

    async def run_once(self) -> int:
        """Apply what the ledger holds; the number of jobs handed back."""
        if self._subscription is None:
            if time.monotonic() - self._failed_at < RETRY_STREAM_S:
                return 0
            try:
                await handbacks.ensure_stream(self._js, self._nats)
                self._subscription = await self._js.pull_subscribe(
                    handbacks.subject(self._nats),
                    durable=handbacks.consumer_name(self._nats),
                    stream=handbacks.stream_name(self._nats),
                )
            except Exception:
                self._failed_at = time.monotonic()
                raise
        applied = 0
        for _ in range(ROUNDS):
            try:
                messages = await self._subscription.fetch(BATCH, timeout=FETCH_WAIT_S)
            except nats_errors.TimeoutError:
                break
            applied += await self._apply(messages)
            if len(messages) < BATCH:
                break
        return applied

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _apply(self, messages: list[Any]) -> int:
        applied = 0
        for index, message in enumerate(messages):
            try:
                entry = handbacks.HandBack.decode(message.data)
            except ValueError as exc:
                log.error("undecodable hand-back dropped", extra={"error": str(exc)})
                await message.term()
                continue
            try:
                state = await db.hand_back(
                    self._pool, entry.job_id, entry.attempt, worker_id=entry.worker_id
                )
            except Exception:
                # Given back at once, this and the rest: the next round tries again
                # (left alone, JetStream would redeliver only after its ack wait).
                for unapplied in messages[index:]:
                    with contextlib.suppress(Exception):
                        await unapplied.nak()
                raise
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
