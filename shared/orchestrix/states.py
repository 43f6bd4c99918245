"""The job lifecycle: the seven states and the moves allowed between them.

Pure: no I/O. Every SQL update in ``orchestrix.db.jobs`` names the state it
expects to move from, and the tests check those guards against this table.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    """Created by the API; waits for ``run_at``, then for a free slot of a worker
    that serves its queue and type. That worker claims it."""
    WAITING = "WAITING"
    """A job of a workflow some of whose parents have not SUCCEEDED yet: the
    success of the last one makes it PENDING; the failure or cancellation of any
    one makes it CANCELLED."""
    RUNNING = "RUNNING"
    """A worker claimed this attempt and is executing it; that worker finishes it,
    or hands it back to PENDING (attempt not counted) when it must stop first."""
    SUCCEEDED = "SUCCEEDED"
    """Terminal: the executor returned a result."""
    FAILED = "FAILED"
    """Terminal: a permanent error, or the last attempt failed. Only an operator's
    retry (``POST /api/v1/jobs/{id}/retry``) moves it on, to PENDING."""
    RETRYING = "RETRYING"
    """An attempt failed; due again at ``run_at`` and claimed like PENDING."""
    CANCELLED = "CANCELLED"
    """Terminal: a user cancelled the job before it finished. Like FAILED, an
    operator may retry it."""


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # A worker's claim moves a due job straight to RUNNING.
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    # Its last parent succeeded; or one failed or was cancelled (or a user cancelled it).
    JobState.WAITING: frozenset({JobState.PENDING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.RETRYING,
            JobState.CANCELLED,
            # Handed back by a worker shutting down (or one that could not start
            # it): not a failed attempt, so the attempt is not counted and any
            # worker may claim the job again at once.
            JobState.PENDING,
        }
    ),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    # An operator's retry: PENDING again, with a new budget of attempts; WAITING
    # instead for a workflow job whose parents have not all SUCCEEDED. A retry
    # brings back the descendants its job's end had cancelled, as WAITING.
    JobState.FAILED: frozenset({JobState.PENDING, JobState.WAITING}),
    JobState.CANCELLED: frozenset({JobState.PENDING, JobState.WAITING}),
}

# Finished: no worker, scheduler or timer moves these on; only an operator's retry
# does, for RETRYABLE_BY_HAND.
TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
RETRYABLE_BY_HAND: frozenset[JobState] = frozenset({JobState.FAILED, JobState.CANCELLED})

# States from which a worker claims a job once its run_at has passed.
CLAIMABLE: frozenset[JobState] = frozenset({JobState.PENDING, JobState.RETRYING})

# States a user can cancel at once, without asking a worker to stop anything.
CANCELLABLE_AT_ONCE: frozenset[JobState] = frozenset(
    {JobState.PENDING, JobState.WAITING, JobState.RETRYING}
)

# States a job is created in: WAITING when it has parents (a workflow's).
INITIAL: frozenset[JobState] = frozenset({JobState.PENDING, JobState.WAITING})


class InvalidTransition(ValueError):
    def __init__(self, source: JobState, target: JobState) -> None:
        super().__init__(f"a {source} job cannot become {target}")
        self.source = source
        self.target = target


def can_transition(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[source]


def check_transition(source: JobState, target: JobState) -> None:
    if not can_transition(source, target):
        raise InvalidTransition(source, target)


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states a job may be in for an update to ``target`` to apply."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if target in nxt)
