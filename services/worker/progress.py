"""Progress that executors report (``job.progress(...)``), written to their jobs.

Executors may report as often as they like, from the event loop or a thread;
only each attempt's latest report is kept, and every ``EVERY_S`` the reports
gathered since the last write go out in one statement for the whole worker. A
report is written only while its attempt is RUNNING on this worker, so a
report that arrives as the job ends is dropped, never written over a later
attempt's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from orchestrix.db import jobs as db
from orchestrix.db.pool import TRANSIENT

log = logging.getLogger("worker")
EVERY_S = 1.0


class ProgressWriter:
    def __init__(self, pool: Any, worker_id: str) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._lock = threading.Lock()  # reports come from executor threads too
        self._pending: dict[str, tuple[int, bytes]] = {}

    def reporter(self, job_id: str, attempt: int) -> Callable[[bytes], None]:
        """Where one attempt's reports (JSON bytes) go."""

        def report(data: bytes) -> None:
            with self._lock:
                self._pending[job_id] = (attempt, data)

        return report

    async def run_once(self) -> int:
        """Write the reports gathered so far; how many."""
        with self._lock:
            taken, self._pending = self._pending, {}
        if not taken:
            return 0
        reports = [(job_id, attempt, data.decode()) for job_id, (attempt, data) in taken.items()]
        try:
            await db.write_progress(self._pool, reports, worker_id=self._worker_id)
        except TRANSIENT:
            with self._lock:  # kept for the next round, unless newer ones came
                for job_id, report in taken.items():
                    self._pending.setdefault(job_id, report)
            raise
        return len(reports)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            try:
                await self.run_once()
            except TRANSIENT as exc:
                log.warning("progress not written; retrying", extra={"error": repr(exc)})
            except Exception:
                log.exception("progress not written")
