"""What a stopped attempt writes, on a real database: hand-backs, their limit, cancels."""

from __future__ import annotations

import asyncpg
from orchestrix.db import jobs as db
from orchestrix.metrics import WorkerMetrics
from orchestrix.models import Job, NewJob
from orchestrix.services.worker.completer import Completer
from orchestrix.services.worker.stops import MAX_HANDOFFS, Stop, Stopper
from orchestrix.settings import RetrySettings
from orchestrix.states import JobState

WORKER = "stopping-worker"


async def claimed(pool: asyncpg.Pool, max_attempts: int = 3) -> Job:
    await db.insert(pool, NewJob(type="t", max_attempts=max_attempts))
    (job,) = await db.claim(pool, worker_id=WORKER, queues=None, types=["t"], limit=1, lease_s=30)
    return job


def stopper(pool: asyncpg.Pool) -> Stopper:
    metrics = WorkerMetrics(1)
    completer = Completer(pool, RetrySettings(), metrics, worker_id=WORKER)
    return Stopper(pool, completer, metrics, worker_id=WORKER)


async def test_a_shutdown_hands_back_uncounted_until_the_limit_then_counts(
    pool: asyncpg.Pool,
) -> None:
    job = await claimed(pool)
    for handoffs in range(1, MAX_HANDOFFS + 1):
        await stopper(pool).finish(job, Stop.SHUTDOWN)
        back = await db.get(pool, job.id)
        assert back is not None
        assert (back.state, back.attempt, back.handoffs) == (JobState.PENDING, 0, handoffs)
        assert back.errors == []
        (job,) = await db.claim(
            pool, worker_id=WORKER, queues=None, types=["t"], limit=1, lease_s=30
        )
    # One hand-back more than the limit: this shutdown counts as a failed attempt.
    await stopper(pool).finish(job, Stop.SHUTDOWN)
    after = await db.get(pool, job.id)
    assert after is not None
    assert (after.state, after.attempt, after.handoffs) == (JobState.RETRYING, 1, 0)
    assert after.last_error is not None
    assert after.last_error.startswith("Interrupted:")


async def test_a_cancel_asked_for_before_the_hand_back_is_honoured(pool: asyncpg.Pool) -> None:
    job = await claimed(pool)
    await db.request_cancel(pool, job.id)
    await stopper(pool).finish(job, Stop.SHUTDOWN)
    after = await db.get(pool, job.id)
    assert after is not None
    assert after.state is JobState.CANCELLED
    assert after.completed_at is not None


async def test_a_lost_attempt_writes_nothing(pool: asyncpg.Pool) -> None:
    job = await claimed(pool)
    await stopper(pool).finish(job, Stop.LOST)
    after = await db.get(pool, job.id)
    assert after is not None
    assert (after.state, after.attempt) == (JobState.RUNNING, 1)
