"""Reading the executions file and judging it against the jobs' final rows: pure functions.

The chaos executors (``tests/chaos/executors.py``) write a START line and an end
line (END, FAIL or CANCEL) for every execution; the run knows what it did to
which process and server when (:class:`Faults`). From those two sources alone,
and the final rows, this module decides, without trusting the services' own
bookkeeping:

- whether two executions of one job ran at the same time: the same attempt (a
  *duplicate*) or two attempts (an *overlap*); an execution without an end line
  ran until its process was SIGKILLed or exited, and, if neither, may still run;
- why each execution happened and what it became (its *fate*): the counted
  success, a planned failure, a timeout, a cancellation, a hand-back by a
  stopping worker, an attempt cut short by SIGKILL, one fenced while its worker
  could not reach PostgreSQL; and which ones nothing the run did explains;
- whether the row counts retries right: an ``errors`` entry for every attempt
  but a successful last one, each entry explained by the execution of its
  attempt (a PlannedFailure by a FAIL line within the plan's ``fail_times``, a
  JobTimeout by a CANCEL after the timeout, a WorkerLost by a kill or an
  outage), and ``handoffs`` equal to the hand-backs of the last attempt;
- whether a shutdown cost anything: a stopping worker hands its unfinished
  attempts back uncounted, so a WorkerLost for an attempt of a SIGTERMed worker
  is a shutdown that used an attempt, and a job FAILED because of one is failed
  by a shutdown. The one exception is reported on its own, as a known
  limitation: a worker that must exit while PostgreSQL is away cannot write its
  hand-backs, and its attempts are taken back counted (*an attempt lost to a
  shutdown during a database outage*);
- whether every accepted cancellation was honoured: the job ends CANCELLED, no
  execution runs to its end after the request, and none starts after it;
- whether each job's history (its ``job_events``) tells what its row and the
  executions tell: a chain of moves the state table allows, from PENDING to the
  row's state; a claim (a move to RUNNING) for every execution of each attempt;
  an ``errors`` entry for every move out of RUNNING that counted a failure;
- whether each job ended as its plan says (``payload["plan"]``): ``plain``,
  ``long`` and ``retry`` jobs SUCCEEDED, ``timeout`` jobs FAILED after all their attempts,
  ``cancel`` jobs CANCELLED.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from orchestrix.services.worker.stops import MAX_HANDOFFS
from orchestrix.states import INITIAL, JobState, can_transition

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
WORKER_LOST = "WorkerLost"
JOB_TIMEOUT = "JobTimeout"
PLANNED_FAILURE = "PlannedFailure"
INTERRUPTED = "Interrupted"
ENDS = ("END", "FAIL", "CANCEL")
# A timed-out execution's CANCEL comes at least this close to its timeout after
# its START (the timeout starts just before the executor's first line).
TIMEOUT_SLACK_S = 0.05
# A fence or an unwritten outcome is explained by trouble with PostgreSQL this
# long before it (the renewals that failed came within a lease before the fence).
TROUBLE_LOOKBACK_S = 4.0
# After PostgreSQL is back (or fast again), a worker's heartbeat takes this long
# to reconnect and renew: the trouble lasts that much longer for it.
RECONNECT_S = 1.0
# An attempt taken back without an execution: its claim was in flight during a
# fault this long before the rescue (a lease and the rescuer's grace, and more).
UNSTARTED_LOOKBACK_S = 15.0
# A worker writes START a moment after its claim committed: a DELETE answered
# 202 (the job RUNNING) may come back first.
CLAIM_TO_START_S = 0.5
LOST_TO_SHUTDOWN_IN_OUTAGE = "attempt lost to a shutdown during a database outage"


class Judgement(Enum):
    """What an execution's fate, or an ``errors`` entry, says about the engine."""

    EXPLAINED = "explained"  # what the run did allows it
    LIMITATION = "known limitation"  # reported on its own, not a failure
    UNEXPLAINED = "unexplained"  # a bug: the test fails


@dataclass
class Execution:
    """One START line, with the end line (END, FAIL or CANCEL) of the process that closed it."""

    job_id: str
    attempt: int
    pid: int
    started: float
    ended: float | None = None
    end: str | None = None

    @property
    def finished(self) -> bool:
        """The executor returned its result (an END line)."""
        return self.end == "END"

    @property
    def failed(self) -> bool:
        """The executor raised its planned failure (a FAIL line)."""
        return self.end == "FAIL"

    @property
    def cancelled(self) -> bool:
        """The worker stopped the executor (a CANCEL line)."""
        return self.end == "CANCEL"

    def describe(self, faults: Faults, origin: float) -> str:
        """One line for a failure message, times relative to ``origin`` (the run's start)."""
        text = f"attempt {self.attempt} in pid {self.pid} from +{self.started - origin:.2f}s"
        if self.ended is not None:
            text += f", {self.end} at +{self.ended - origin:.2f}s"
        else:
            text += ", no end"
        killed = faults.killed(self)
        if killed is not None:
            text += f" (pid SIGKILLed at +{killed - origin:.2f}s)"
        termed = faults.terms.get(self.pid)
        if termed is not None:
            text += f" (pid SIGTERMed at +{termed - origin:.2f}s)"
        return text


@dataclass(frozen=True)
class Parsed:
    """The executions file, as executions and the lines that made no sense."""

    executions: list[Execution]
    bad_lines: list[str]  # malformed lines, and end lines without a START


def parse(text: str) -> Parsed:
    """Pair each START with the first later end line of the same job, attempt and pid."""
    executions: list[Execution] = []
    open_: dict[tuple[str, int, int], deque[Execution]] = defaultdict(deque)
    bad: list[str] = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) != 5 or parts[0] not in ("START", *ENDS):
            bad.append(line)
            continue
        kind, job_id, attempt_text, pid_text, moment_text = parts
        try:
            attempt, pid, moment = int(attempt_text), int(pid_text), float(moment_text)
        except ValueError:
            bad.append(line)
            continue
        key = (job_id, attempt, pid)
        if kind == "START":
            execution = Execution(job_id, attempt, pid, moment)
            executions.append(execution)
            open_[key].append(execution)
        elif open_[key]:
            closed = open_[key].popleft()
            closed.ended = moment
            closed.end = kind
        else:
            bad.append(line)
    return Parsed(executions, bad)


@dataclass(frozen=True)
class Window:
    """A time PostgreSQL was away (``unreachable``) or slow for some workers (``pids``,
    None: every worker)."""

    start: float
    end: float
    what: str
    unreachable: bool = True
    pids: frozenset[int] | None = None

    def covers(self, pid: int, start: float, end: float) -> bool:
        """The window, and the reconnection after it, touch [start, end] for this worker."""
        return (
            (self.pids is None or pid in self.pids)
            and self.start <= end
            and self.end + RECONNECT_S >= start
        )


@dataclass(frozen=True)
class CancelRequest:
    """The DELETE the run sent for a job, and the answer it settled on."""

    sent: float  # when the DELETE that was answered went out
    answered: float
    status: int  # 200 cancelled at once, 202 requested while running, 409 too late


@dataclass
class Faults:
    """What the run did: the facts that explain executions."""

    kills: Mapping[int, float] = field(default_factory=dict)  # pid -> SIGKILL
    terms: Mapping[int, float] = field(default_factory=dict)  # pid -> SIGTERM sent
    exits: Mapping[int, float] = field(default_factory=dict)  # pid -> seen exited (not killed)
    windows: Sequence[Window] = ()
    cancels: Mapping[str, CancelRequest] = field(default_factory=dict)  # job id -> DELETE

    def killed(self, run: Execution) -> float | None:
        """When the run SIGKILLed this execution's process, if it did so after the START."""
        killed = self.kills.get(run.pid)
        return killed if killed is not None and killed >= run.started else None

    def until(self, run: Execution) -> float:
        """The end of the interval in which this execution may have been running.

        An execution without an end line ran until its process was killed or
        exited; if neither, for all we know it still runs (+inf).
        """
        if run.ended is not None:
            return run.ended
        ends = [t for t in (self.killed(run), self.exits.get(run.pid)) if t is not None]
        ends = [t for t in ends if t >= run.started]
        return min(ends) if ends else math.inf

    def trouble(
        self, pid: int, start: float, end: float, *, unreachable: bool = False
    ) -> Window | None:
        """A window in which PostgreSQL was away (or, unless ``unreachable``, slow) for
        this worker, touching [start, end]."""
        for window in self.windows:
            if (window.unreachable or not unreachable) and window.covers(pid, start, end):
                return window
        return None

    def any_fault(self, start: float, end: float) -> str | None:
        """Some kill or outage between ``start`` and ``end``, named."""
        for pid, at in self.kills.items():
            if start <= at <= end:
                return f"pid {pid} SIGKILLed"
        for window in self.windows:
            if window.unreachable and window.start <= end and window.end >= start:
                return window.what
        return None


@dataclass(frozen=True)
class JobRow:
    """The columns of a job's final row that the judgement needs."""

    id: str
    state: str
    attempt: int
    max_attempts: int
    last_error: str | None
    errors: Sequence[Mapping[str, Any]]
    payload: Mapping[str, Any] = field(default_factory=dict)
    timeout_seconds: int = 300
    handoffs: int = 0
    # (from, to, attempt) of each of its events, oldest first; None: not read.
    history: Sequence[tuple[str | None, str, int]] | None = None
    # A workflow's job: its parents, the job whose end cancelled it, and when it
    # finished (seconds since the epoch).
    parents: tuple[str, ...] = ()
    cancelled_by: str | None = None
    completed: float | None = None
    # Its limits, and when each of its attempts was claimed (its moves to RUNNING
    # in job_events: a limited claim stamps them with the time it took the token).
    concurrency_key: str | None = None
    rate_limit: str | None = None
    claimed_at: tuple[float, ...] = ()

    @property
    def plan(self) -> str:
        """What the suite expects of the job: plain, long, retry, timeout or cancel."""
        return str(self.payload.get("plan", "plain"))

    @property
    def fail_times(self) -> int:
        return int(self.payload.get("fail_times", 0))

    @property
    def workers_lost(self) -> int:
        """Failed attempts that the rescuer recorded as lost with their worker."""
        return sum(1 for e in self.errors if str(e.get("error", "")).startswith(WORKER_LOST))


def error_time(entry: Mapping[str, Any]) -> float:
    """When an ``errors`` entry was written (epoch seconds)."""
    return datetime.fromisoformat(str(entry["at"])).timestamp()


@dataclass(frozen=True)
class Duplicate:
    """Two executions of one job whose intervals overlap."""

    first: Execution
    second: Execution


@dataclass(frozen=True)
class Fate:
    """Why one execution happened and what it became; ``execution`` None: an attempt
    that was counted without ever running."""

    job_id: str
    attempt: int
    execution: Execution | None
    reason: str
    judgement: Judgement


@dataclass(frozen=True)
class JobProblem:
    """Something wrong with a job as a whole: ``check`` names the check it fails."""

    job_id: str
    check: str
    text: str


# The checks a JobProblem can fail, as the report names them.
RETRIES = "retries counted right"
FINAL_STATE = "ended as planned"
SHUTDOWN_FAILED = "none FAILED by a shutdown"
CANCEL_HONOURED = "every cancellation honoured"
HISTORY = "history tells what the row and the executions tell"
WORKFLOWS = "no child before its parents, every workflow ended as expected"
LIMITS = "no key above its limit, no rate limit above its bucket"


@dataclass(frozen=True)
class Limits:
    """The limits the run set: every key's, and the one rate limit's."""

    key_limit: int
    rate_per_s: float
    rate_burst: int


@dataclass
class Verdict:
    """What the executions say about the run; the test fails on what must not happen."""

    executions_per_job: Counter[int] = field(default_factory=Counter)
    executions: int = 0
    cut_short_by_kill: int = 0  # a START whose process was SIGKILLed before the end line
    duplicates: list[Duplicate] = field(default_factory=list)
    overlapping_attempts: list[Duplicate] = field(default_factory=list)
    fates: list[Fate] = field(default_factory=list)
    job_problems: list[JobProblem] = field(default_factory=list)
    # A SUCCEEDED job with no finished execution of its final attempt.
    succeeded_unrun: list[str] = field(default_factory=list)
    # Executions of jobs that were not submitted by this run.
    strangers: list[Execution] = field(default_factory=list)
    # FAILED jobs whose every attempt a fault other than a shutdown explains.
    failed_by_faults: list[str] = field(default_factory=list)
    # Seconds from an accepted DELETE (202) to the CANCEL line of the execution it stopped.
    cancel_delays: list[float] = field(default_factory=list)
    # The most executions of one key at once, and the rate limit's most starts
    # beyond what its rate allows over any span (at most its burst).
    key_peak: int = 0
    rate_excess: float = 0.0

    @property
    def unexplained(self) -> list[Fate]:
        return [f for f in self.fates if f.judgement is Judgement.UNEXPLAINED]

    @property
    def limitations(self) -> list[Fate]:
        return [f for f in self.fates if f.judgement is Judgement.LIMITATION]

    def reasons(self, judgement: Judgement) -> Counter[str]:
        """How many fates of each kind of reason there are, times left out."""
        return Counter(
            re.sub(r"[+-]?\d+\.\d+s|pid \d+", "T", f.reason)
            for f in self.fates
            if f.judgement is judgement
        )

    def problems_of(self, check: str) -> list[JobProblem]:
        return [p for p in self.job_problems if p.check == check]


@dataclass
class _Job:
    """The judgement of one terminal job: its executions against its row."""

    row: JobRow
    runs: Sequence[Execution]
    faults: Faults
    origin: float
    verdict: Verdict
    shutdown_cost: list[str] = field(default_factory=list)  # attempts a shutdown counted

    def fate(self, attempt: int, run: Execution | None, reason: str, judgement: Judgement) -> None:
        self.verdict.fates.append(Fate(self.row.id, attempt, run, reason, judgement))
        if judgement is Judgement.LIMITATION or reason.startswith("attempt used by a shutdown"):
            self.shutdown_cost.append(f"attempt {attempt}: {reason}")

    def problem(self, check: str, text: str) -> None:
        self.verdict.job_problems.append(JobProblem(self.row.id, check, text))

    def at(self, moment: float) -> str:
        return f"+{moment - self.origin:.2f}s"

    def judge(self) -> None:
        row = self.row
        entries = self.entries()
        by_attempt: dict[int, list[Execution]] = defaultdict(list)
        for run in self.runs:
            by_attempt[run.attempt].append(run)
        # A job cancelled while PENDING after a hand-back has the attempt number
        # from before it (the hand-back gave it back): its executions were all handed back.
        given_back = row.attempt + 1 if row.state == "CANCELLED" else None
        for run in by_attempt.get(given_back or -1, []):
            self.handed_back(row.attempt + 1, run)
        for attempt, runs in sorted(by_attempt.items()):
            if not 1 <= attempt <= row.attempt and attempt != given_back:
                for run in runs:
                    self.fate(
                        attempt,
                        run,
                        f"ran attempt {attempt}, beyond the row's attempt {row.attempt}",
                        Judgement.UNEXPLAINED,
                    )
        handbacks_in_a_row = 0
        for attempt in range(1, row.attempt + 1):
            runs = by_attempt.get(attempt, [])
            # A hand-back gives the attempt number back: every execution of an
            # attempt but its last was handed back by a stopping worker.
            for run in runs[:-1]:
                self.handed_back(attempt, run)
            handbacks_in_a_row += max(len(runs) - 1, 0)
            last = runs[-1] if runs else None
            entry = entries.get(attempt)
            if entry is not None:
                reason, judgement = self.explain(attempt, entry, last, handbacks_in_a_row)
                self.fate(attempt, last, reason, judgement)
                handbacks_in_a_row = 0
            elif attempt == row.attempt:
                self.last_attempt(attempt, last)
            elif last is not None:
                self.fate(attempt, last, "its attempt has no errors entry", Judgement.UNEXPLAINED)
        self.final_state()
        self.cancellation()
        self.history()
        if row.state == "SUCCEEDED":
            # Each execution of the last attempt but the final one was handed back.
            # A hand-back can also come before its executor started (a worker that
            # could not renew the lease of a job it had just started stops it, and
            # no execution is recorded): more handoffs than that are possible, fewer
            # are not.
            handbacks = max(len(by_attempt.get(row.attempt, [])) - 1, 0)
            if row.handoffs < handbacks:
                self.problem(
                    RETRIES,
                    f"handoffs is {row.handoffs}, but the executions show {handbacks} "
                    f"hand-backs of its last attempt {row.attempt}",
                )

    def entries(self) -> dict[int, Mapping[str, Any]]:
        """The ``errors`` entries by attempt, after checking that they count every attempt."""
        row = self.row
        entries: dict[int, Mapping[str, Any]] = {}
        for entry in row.errors:
            attempt = int(entry.get("attempt", 0))
            if attempt in entries:
                self.problem(RETRIES, f"two errors entries for attempt {attempt}")
            entries[attempt] = entry
        # Every attempt before the last failed; the last failed too when the job FAILED,
        # and may have (a retry or a rescue that found the cancellation) when CANCELLED.
        required = set(range(1, row.attempt)) | ({row.attempt} if row.state == "FAILED" else set())
        allowed = required | ({row.attempt} if row.state == "CANCELLED" else set())
        if missing := sorted(required - set(entries)):
            self.problem(RETRIES, f"attempt {row.attempt}, but no errors entry for {missing}")
        if extra := sorted(set(entries) - allowed):
            self.problem(RETRIES, f"attempt {row.attempt}, but errors entries for {extra}")
        if row.state == "FAILED" and row.attempt != row.max_attempts:
            self.problem(
                RETRIES, f"FAILED at attempt {row.attempt} of {row.max_attempts}: none is permanent"
            )
        return entries

    def handed_back(self, attempt: int, run: Execution) -> None:
        """An execution after which the same attempt ran again: only a hand-back does that."""
        termed = self.faults.terms.get(run.pid)
        trouble = (
            self.faults.trouble(run.pid, run.ended - TROUBLE_LOOKBACK_S, run.ended)
            if run.cancelled and run.ended is not None
            else None
        )
        if run.cancelled and run.ended is not None and termed is not None and termed <= run.ended:
            self.fate(attempt, run, "handed back by its stopping worker", Judgement.EXPLAINED)
        elif trouble is not None:
            # The fence stopped it (PostgreSQL did not answer) and returned it through
            # the hand-back ledger: the same attempt, not counted.
            self.fate(
                attempt,
                run,
                f"fenced, then returned through the hand-back ledger ({trouble.what})",
                Judgement.EXPLAINED,
            )
        else:
            self.fate(
                attempt,
                run,
                "its attempt ran again uncounted, yet it was no hand-back by a stopping worker",
                Judgement.UNEXPLAINED,
            )

    def explain(
        self, attempt: int, entry: Mapping[str, Any], last: Execution | None, handbacks: int
    ) -> tuple[str, Judgement]:
        """Why the row counts ``attempt`` as failed, from its last execution."""
        row = self.row
        text = str(entry.get("error", ""))
        if text.startswith(PLANNED_FAILURE):
            if attempt > row.fail_times:
                return f"PlannedFailure beyond the plan's {row.fail_times}", Judgement.UNEXPLAINED
            if last is None or not last.failed:
                return "PlannedFailure recorded without a FAIL line", Judgement.UNEXPLAINED
            return "failed as planned", Judgement.EXPLAINED
        if text.startswith(JOB_TIMEOUT):
            ran = last.ended - last.started if last is not None and last.ended else 0.0
            if last is None or not last.cancelled or ran < row.timeout_seconds - TIMEOUT_SLACK_S:
                return "JobTimeout recorded without an execution that ran its time out", (
                    Judgement.UNEXPLAINED
                )
            if row.plan != "timeout":
                return "timed out, though its plan has no timeout", Judgement.UNEXPLAINED
            return "timed out", Judgement.EXPLAINED
        if text.startswith(INTERRUPTED):
            if handbacks >= MAX_HANDOFFS:
                return f"interrupted by a shutdown after {handbacks} hand-backs", (
                    Judgement.EXPLAINED
                )
            return f"attempt used by a shutdown: Interrupted after {handbacks} hand-backs", (
                Judgement.UNEXPLAINED
            )
        if text.startswith(WORKER_LOST):
            return self.lost(last, error_time(entry))
        return f"unexpected error {text[:80]!r}", Judgement.UNEXPLAINED

    def lost(self, last: Execution | None, lost_at: float) -> tuple[str, Judgement]:
        """Why the rescuer (or the lifeline) took the attempt back at ``lost_at``."""
        faults = self.faults
        if last is None:
            fault = faults.any_fault(lost_at - UNSTARTED_LOOKBACK_S, lost_at)
            if fault is None:
                return "taken back without ever running, and no fault before", (
                    Judgement.UNEXPLAINED
                )
            return "taken back before it started (claimed during a fault)", Judgement.EXPLAINED
        killed = faults.killed(last)
        if killed is not None and killed <= lost_at:
            if last.ended is None:
                return "cut short by SIGKILL", Judgement.EXPLAINED
            return "ended, but its worker was SIGKILLed before the outcome was written", (
                Judgement.EXPLAINED
            )
        termed = faults.terms.get(last.pid)
        if termed is not None and termed <= (last.ended or lost_at):
            gone = faults.exits.get(last.pid, lost_at)
            outage = faults.trouble(last.pid, termed, gone, unreachable=True)
            if outage is not None:
                return f"{LOST_TO_SHUTDOWN_IN_OUTAGE} ({outage.what})", Judgement.LIMITATION
            return "attempt used by a shutdown: WorkerLost instead of a hand-back", (
                Judgement.UNEXPLAINED
            )
        if last.ended is not None and last.ended <= lost_at:
            trouble = faults.trouble(last.pid, last.ended - TROUBLE_LOOKBACK_S, lost_at)
            if last.cancelled:
                what = "stopped by its worker (fenced or cancelled), then taken back"
            else:
                what = "ended, but its outcome was not written before its lease ran out"
            if trouble is None:
                return f"{what}, while PostgreSQL was fine", Judgement.UNEXPLAINED
            return f"{what} ({trouble.what})", Judgement.EXPLAINED
        later = f", SIGKILLed only at {self.at(killed)}" if killed is not None else ""
        return (
            f"lease declared lost at {self.at(lost_at)} while its live worker was still on "
            f"it{later}",
            Judgement.UNEXPLAINED,
        )

    def last_attempt(self, attempt: int, last: Execution | None) -> None:
        """The last attempt, when the row records no failure of it."""
        row = self.row
        if row.state == "SUCCEEDED":
            if last is None or not last.finished:
                self.verdict.succeeded_unrun.append(row.id)
                if last is not None:
                    self.fate(attempt, last, "the job SUCCEEDED without it", Judgement.UNEXPLAINED)
                return
            if attempt <= row.fail_times:
                self.problem(RETRIES, f"SUCCEEDED at attempt {attempt}, planned to fail it")
            self.fate(attempt, last, "the counted success", Judgement.EXPLAINED)
        elif row.state == "CANCELLED":
            request = self.faults.cancels.get(row.id)
            if request is None or request.status not in (200, 202):
                if last is not None:
                    self.fate(attempt, last, "cancelled, never asked to", Judgement.UNEXPLAINED)
            elif last is not None:
                if last.cancelled:
                    self.fate(attempt, last, "cancelled as requested", Judgement.EXPLAINED)
                else:
                    self.fate(
                        attempt,
                        last,
                        f"the job was CANCELLED while this execution ended {last.end}",
                        Judgement.UNEXPLAINED,
                    )

    def final_state(self) -> None:
        """The state the job's plan calls for; a FAILED job that should not be, and why."""
        row = self.row
        expected = {"timeout": "FAILED", "cancel": "CANCELLED"}.get(row.plan, "SUCCEEDED")
        if row.state == expected:
            return
        if row.state == "CANCELLED" and row.cancelled_by is not None:
            return  # its workflow's check judges it (an ancestor ended first)
        if row.state == "FAILED" and self.shutdown_cost:
            self.problem(
                SHUTDOWN_FAILED,
                f"FAILED, and a shutdown counted {len(self.shutdown_cost)} of its attempts: "
                + "; ".join(self.shutdown_cost),
            )
            return
        mine = [f for f in self.verdict.fates if f.job_id == row.id]
        # Every attempt lost to a kill or an outage: the at-least-once price.
        if (
            row.state == "FAILED"
            and all(f.judgement is Judgement.EXPLAINED for f in mine)
            and all(str(e.get("error", "")).startswith(WORKER_LOST) for e in row.errors)
        ):
            self.verdict.failed_by_faults.append(row.id)
            return
        self.problem(
            FINAL_STATE,
            f"a {row.plan} job ended {row.state} (expected {expected}): {row.last_error}",
        )

    def history(self) -> None:
        """No lost event and no extra one: see the module's docstring."""
        row = self.row
        if row.history is None:
            return
        moves = list(row.history)
        # A job inserted by plain SQL (as the suite's bulk loader does) has no
        # creation event: it starts PENDING all the same.
        state = "PENDING"
        if moves and moves[0][0] is None:
            state = moves[0][1]
            if JobState(state) not in INITIAL:
                self.problem(HISTORY, f"created {state}, not PENDING or WAITING")
                return
            moves = moves[1:]
        for number, (source, target, attempt) in enumerate(moves, 1):
            if source != state:
                self.problem(HISTORY, f"event {number} moves from {source}, but it was {state}")
                return
            if source is None or not can_transition(JobState(source), JobState(target)):
                self.problem(
                    HISTORY,
                    f"event {number} moves {source} to {target} (attempt "
                    f"{attempt}), which the state table does not allow",
                )
                return
            state = target
        if state != row.state:
            self.problem(HISTORY, f"its events end {state}, its row is {row.state}")
        claims = Counter(attempt for _, target, attempt in moves if target == "RUNNING")
        for attempt, runs in sorted(Counter(run.attempt for run in self.runs).items()):
            if claims[attempt] < runs:
                self.problem(
                    HISTORY,
                    f"{runs} executions of attempt {attempt}, "
                    f"but {claims[attempt]} claims of it in its events",
                )
        ended = Counter(target for source, target, _ in moves if source == "RUNNING")
        failed = ended["RETRYING"] + ended["FAILED"]
        if not failed <= len(row.errors) <= failed + ended["CANCELLED"]:
            self.problem(
                HISTORY,
                f"{len(row.errors)} errors entries, but its events end {failed} attempts in "
                f"a failure and {ended['CANCELLED']} in a cancellation",
            )

    def cancellation(self) -> None:
        """An accepted DELETE: CANCELLED, nothing ran on to its end or started after it."""
        row = self.row
        request = self.faults.cancels.get(row.id)
        if request is None:
            if row.plan == "cancel":
                self.problem(CANCEL_HONOURED, "a cancel job the run never sent a DELETE for")
            return
        if request.status not in (200, 202):
            if row.plan == "cancel":
                self.problem(CANCEL_HONOURED, f"DELETE answered {request.status}")
            return
        when = f"DELETE at {self.at(request.sent)} answered {request.status}"
        if row.state != "CANCELLED":
            self.problem(CANCEL_HONOURED, f"{when}, but the job ended {row.state}")
        for run in self.runs:
            if run.started > request.answered + CLAIM_TO_START_S:
                self.problem(
                    CANCEL_HONOURED,
                    f"{when}, yet {run.describe(self.faults, self.origin)} started after it",
                )
            elif run.ended is not None and run.ended > request.sent and not run.cancelled:
                self.problem(
                    CANCEL_HONOURED,
                    f"{when}, yet {run.describe(self.faults, self.origin)} ran on to its end",
                )
            elif (
                request.status == 202
                and run.cancelled
                and run.ended is not None
                and run.ended >= request.sent
            ):
                self.verdict.cancel_delays.append(max(run.ended - request.answered, 0.0))


def judge(
    executions: Iterable[Execution],
    rows: Mapping[str, JobRow],
    faults: Faults,
    origin: float = 0.0,
    limits: Limits | None = None,
) -> Verdict:
    """Judge every execution of the submitted jobs (``rows``, keyed by job id).

    ``faults`` is what the run did; ``origin`` the time that messages show as +0s.
    Jobs that are not terminal get no verdict beyond overlaps: they are
    reported as lost instead.
    """
    verdict = Verdict()
    by_job: dict[str, list[Execution]] = defaultdict(list)
    for run in executions:
        verdict.executions += 1
        if run.ended is None and faults.killed(run) is not None:
            verdict.cut_short_by_kill += 1
        if run.job_id in rows:
            by_job[run.job_id].append(run)
        else:
            verdict.strangers.append(run)
    for job_id, row in rows.items():
        runs = sorted(by_job.get(job_id, []), key=lambda r: r.started)
        verdict.executions_per_job[len(runs)] += 1
        for i, first in enumerate(runs):
            for second in runs[i + 1 :]:
                if second.started >= faults.until(first):
                    continue
                if first.attempt == second.attempt:
                    verdict.duplicates.append(Duplicate(first, second))
                else:
                    verdict.overlapping_attempts.append(Duplicate(first, second))
        if row.state in TERMINAL:
            _Job(row, runs, faults, origin, verdict).judge()
    _judge_workflows(rows, by_job, verdict)
    if limits is not None:
        _judge_limits(rows, by_job, faults, limits, verdict)
    return verdict


def bucket_excess(starts: Sequence[float], rate: float) -> float:
    """The most starts in any span beyond what ``rate`` allows over it: the max over
    i <= j of (j - i + 1) - rate * (t_j - t_i), for ``starts`` in order."""
    best = 0.0
    lowest = math.inf  # the least i - rate * t_i so far
    for j, t in enumerate(starts):
        lowest = min(lowest, j - rate * t)
        best = max(best, j - rate * t - lowest + 1)
    return best


def _judge_limits(
    rows: Mapping[str, JobRow],
    runs: Mapping[str, Sequence[Execution]],
    faults: Faults,
    limits: Limits,
    verdict: Verdict,
) -> None:
    """From the executions: never more of a key at once than its limit (an execution
    lasts from its START to its end line, or to its process's death). From the
    claims: never more starts under the rate limit than its bucket allows.

    Only async executions count for keys: a plain-function one that a worker gave
    up on may run on past the end of its attempt (docs/architecture.md, known gaps),
    and so past its key's slot."""
    spans: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    starts: list[float] = []
    for row in rows.values():
        if row.concurrency_key is not None:
            for run in runs.get(row.id, []):
                spans[row.concurrency_key].append((run.started, 1, row.id))
                spans[row.concurrency_key].append((faults.until(run), -1, row.id))
        if row.rate_limit is not None:
            starts.extend(row.claimed_at)
    for key, points in spans.items():
        running = 0
        for _at, step, job_id in sorted(points):  # an end sorts before a start at one time
            running += step
            verdict.key_peak = max(verdict.key_peak, running)
            if running > limits.key_limit:
                verdict.job_problems.append(
                    JobProblem(
                        job_id,
                        LIMITS,
                        f"{running} executions of key {key} at once (limit {limits.key_limit})",
                    )
                )
    if starts:
        verdict.rate_excess = bucket_excess(sorted(starts), limits.rate_per_s)
        if verdict.rate_excess > limits.rate_burst + 1e-6:
            verdict.job_problems.append(
                JobProblem(
                    "-",
                    LIMITS,
                    f"{verdict.rate_excess:.2f} starts beyond the rate limit's "
                    f"{limits.rate_per_s:g}/s (burst {limits.rate_burst})",
                )
            )


def _judge_workflows(
    rows: Mapping[str, JobRow], runs: Mapping[str, Sequence[Execution]], verdict: Verdict
) -> None:
    """A workflow's job starts only after every parent's success was written, and ends
    SUCCEEDED when they all did, or CANCELLED (by an ancestor that did not) otherwise."""
    for row in rows.values():
        if not row.parents or row.state not in TERMINAL:
            continue
        parents = [rows.get(p) for p in row.parents]
        if any(p is None for p in parents):
            verdict.job_problems.append(JobProblem(row.id, WORKFLOWS, "a parent is missing"))
            continue
        done = [p for p in parents if p is not None]
        if all(p.state == "SUCCEEDED" for p in done):
            released = max(p.completed or math.inf for p in done)
            early = [run for run in runs.get(row.id, []) if run.started < released]
            if early:
                verdict.job_problems.append(
                    JobProblem(
                        row.id,
                        WORKFLOWS,
                        f"started {released - early[0].started:.3f}s before its last "
                        "parent's success",
                    )
                )
            if row.cancelled_by is not None:
                verdict.job_problems.append(
                    JobProblem(
                        row.id,
                        WORKFLOWS,
                        "cancelled for an ancestor, but its parents all SUCCEEDED",
                    )
                )
            continue
        cause = rows.get(row.cancelled_by or "")
        if row.state != "CANCELLED" or cause is None or cause.state not in ("FAILED", "CANCELLED"):
            verdict.job_problems.append(
                JobProblem(
                    row.id,
                    WORKFLOWS,
                    f"a parent did not succeed, but it ended {row.state} "
                    f"(cancelled_by {row.cancelled_by})",
                )
            )
        elif runs.get(row.id):
            verdict.job_problems.append(
                JobProblem(row.id, WORKFLOWS, "it ran, although a parent never succeeded")
            )
