"""The worker's sign of life, its leases, and the fence that keeps it honest.

On a PostgreSQL connection of its own (so that job writes queueing for the pool
never hold it up), the heartbeat registers the worker in ``workers``, touches
that row every BEAT_S, and renews the leases of every running job at once every
third of LEASE_TIMEOUT. Every statement has a timeout: a hung connection is
dropped and opened again, never waited on. Opening it (several round trips,
more on a slow link) has a longer one: a session dropped while it opens would
start over, and never get to renew anything.

The fence: each job's lease runs out, as far as this worker knows, one lease
after the last renewal it *sent* that was acknowledged (the server's clock
started later). A job whose lease would run out within FENCE_MARGIN_S is
stopped before it does, so the rescuer, which acts only after the lease ran
out, never sees it still running. When neither PostgreSQL nor NATS has answered
for CUT_OFF_S, every job is stopped: the lifeline may soon take them
(``orchestrix.liveness`` says why that is safe).

The heartbeat also says whether the database answers (``reachable``): a worker
that cannot reach it claims nothing. With each renewal it looks for jobs held
for this worker that it does not know of (a claim the server committed but
whose answer was lost) and hands them back, uncounted, so they run at once
instead of after their lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from orchestrix.db import jobs as db
from orchestrix.db import workers
from orchestrix.liveness import BEAT_S, CUT_OFF_S

log = logging.getLogger("worker")
# A job RUNNING for this worker that it does not know of, claimed this long ago,
# came from a claim whose answer never arrived (it gave up on it after
# consumer.CLAIM_TIMEOUT_S); a claim answering now is younger.
ORPHAN_AFTER_S = 15.0
# Opening the heartbeat's session. No job's safety waits on it (the fence goes by
# the leases alone), only the next attempt when a connection hangs.
OPEN_TIMEOUT_S = 10.0


class Heartbeat:
    def __init__(
        self,
        url: str,
        registration: workers.Registration,
        nc: Client,
        *,
        lease_s: float,
        running: Callable[[], dict[str, int]],
        on_renewal: Callable[[db.Renewal], None],
    ) -> None:
        self._url = url
        self._registration = registration
        self._nc = nc
        self._lease_s = lease_s
        self._running = running
        self._on_renewal = on_renewal
        self._conn: asyncpg.Connection | None = None
        # Each statement's timeout (opening a session has OPEN_TIMEOUT_S).
        self._timeout_s = max(BEAT_S, min(5.0, lease_s / 6))
        # Stop a job this long before its lease would run out; never more than a
        # renewal's interval, or a short lease would be fenced before its renewal
        # (a 2 s lease was: every job of more than half a second, at every attempt).
        self.fence_margin_s = min(max(2 * BEAT_S + self._timeout_s, lease_s / 6), lease_s / 3)
        self._renew_every_s = lease_s / 3
        self._renewed_at = time.monotonic()
        self.pg_ok_at = float("-inf")
        self.nats_ok_at = time.monotonic()
        self._lease_until: dict[str, float] = {}
        self.registered = asyncio.Event()

    def leased(self, job_ids: list[str], sent_at: float) -> None:
        """Jobs just claimed, leased by a statement sent at ``sent_at``."""
        until = sent_at + self._lease_s
        for job_id in job_ids:
            self._lease_until[job_id] = until

    def forget(self, job_id: str) -> None:
        self._lease_until.pop(job_id, None)

    def reachable(self, now: float) -> bool:
        return now - self.pg_ok_at < 2 * BEAT_S + self._timeout_s

    def fenced(self, now: float) -> list[str]:
        """Jobs this worker must stop now: its lease on them may be running out."""
        if now - self.pg_ok_at >= CUT_OFF_S and now - self.nats_ok_at >= CUT_OFF_S:
            return list(self._lease_until)
        edge = now + self.fence_margin_s
        return [job_id for job_id, until in self._lease_until.items() if until <= edge]

    async def run(self) -> None:
        nats_beat = asyncio.create_task(self._nats_beats())
        try:
            while True:
                await self._beat()
                await asyncio.sleep(BEAT_S)
        finally:
            nats_beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nats_beat
            if self._conn is not None:
                self._conn.terminate()

    async def deregister(self) -> None:
        """Best effort, at exit: the lifeline forgets a worker whose session ended anyway."""
        try:
            conn = await asyncpg.connect(self._url, timeout=OPEN_TIMEOUT_S)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await workers.deregister(conn, self._registration.id)
            finally:
                conn.terminate()
        except Exception as exc:
            log.warning("worker not deregistered", extra={"error": repr(exc)})

    async def _nats_beats(self) -> None:
        """Every BEAT_S, a message to an inbox of our own, stamped with when it was
        sent: its coming back is NATS answering.

        Nothing here waits with a timeout. nats-py's ``flush(timeout)`` leaves the
        future of a PING that timed out in its queue, and when that PONG arrives
        late its read loop dies: the worker would stay deaf on NATS (wake-ups,
        cancels, the lifeline's probe) until a reconnect, minutes later.
        """
        inbox = self._nc.new_inbox()

        async def echoed(message: Msg) -> None:
            with contextlib.suppress(ValueError):
                # Beats held while NATS was away come back late: never go back in time.
                self.nats_ok_at = max(self.nats_ok_at, float(message.data))

        subscription = await self._nc.subscribe(inbox, cb=echoed)
        try:
            while True:
                try:
                    await self._nc.publish(inbox, repr(time.monotonic()).encode())
                except Exception as exc:
                    log.debug("nats beat not sent", extra={"error": repr(exc)})
                await asyncio.sleep(BEAT_S)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _beat(self) -> None:
        try:
            conn = await self._connection()
            sent = time.monotonic()
            async with asyncio.timeout(self._timeout_s):
                alive = await workers.beat(conn, self._registration.id)
            if not alive:
                # Declared dead by the lifeline, or a new session: register again.
                async with asyncio.timeout(self._timeout_s):
                    await workers.register(conn, self._registration)
            self.pg_ok_at = sent
            self.registered.set()
            # On the last beat before the renewal is due, not on the first one after.
            if sent + BEAT_S >= self._renewed_at + self._renew_every_s:
                await self._renew(conn)
        except Exception as exc:  # a dead beat would let the rescuer take live jobs
            log.warning("heartbeat failed", extra={"error": repr(exc)})
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # Opening a session takes several round trips, and so does the first
            # renewal on it: more than a statement's time on a slow link, and a
            # session dropped for it would start over, never to get there.
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                self._conn = await asyncpg.connect(self._url)
                await workers.register(self._conn, self._registration)
                await db.prepare_renewals(self._conn)
        return self._conn

    async def _renew(self, conn: asyncpg.Connection) -> None:
        mine = self._running()
        sent = time.monotonic()
        async with asyncio.timeout(self._timeout_s):
            renewal = await db.renew_leases(
                conn, mine, self._lease_s, worker_id=self._registration.id
            )
        # Leased from now on, before anything else is asked: the fence counts from here.
        self._renewed_at = sent
        for job_id in mine:
            # A job that ended meanwhile was forgotten: it must not come back here.
            if job_id not in renewal.lost and job_id in self._lease_until:
                self._lease_until[job_id] = sent + self._lease_s
        self._on_renewal(renewal)
        # Claimed for us by a commit we never saw: give them back, uncounted.
        async with asyncio.timeout(self._timeout_s):
            orphans = await db.orphans(
                conn, self._registration.id, list(mine), older_than_s=ORPHAN_AFTER_S
            )
        for job_id, attempt in orphans:
            async with asyncio.timeout(self._timeout_s):
                await db.hand_back(
                    conn, job_id, attempt, counted=False, worker_id=self._registration.id
                )
            log.warning("orphaned claim handed back", extra={"job_id": job_id})
