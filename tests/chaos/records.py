"""Reading the executions file and judging it against the jobs' final rows: pure functions.

The chaos executor (``tests/chaos/executors.py``) writes START / END / CANCEL
lines; the run knows when it SIGKILLed which process. From those two sources
alone this module decides, without trusting the services' own bookkeeping:

- whether one attempt of a job ran twice at the same time (a *duplicate*);
- which executions beyond the one that counted are explained by a kill (the
  at-least-once allowance) and which are not;
- how many times each job ran.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
WORKER_LOST = "WorkerLost"


@dataclass
class Execution:
    """One START line, with the END or CANCEL line of the same process that closed it."""

    job_id: str
    attempt: int
    pid: int
    started: float
    ended: float | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        """The executor returned (an END line)."""
        return self.ended is not None and not self.cancelled

    def killed_by(self, kills: Mapping[int, float]) -> float | None:
        """When the suite SIGKILLed this execution's process, if it did so after the START."""
        killed = kills.get(self.pid)
        return killed if killed is not None and killed >= self.started else None

    def until(self, kills: Mapping[int, float]) -> float:
        """The end of the interval in which this execution may have been running.

        An execution without an END ran until its process was killed, or, if the
        process was never killed, for all we know it still runs (+inf).
        """
        if self.ended is not None:
            return self.ended
        killed = self.killed_by(kills)
        return math.inf if killed is None else killed

    def describe(self, kills: Mapping[int, float], origin: float) -> str:
        """One line for a failure message, times relative to ``origin`` (the run's start)."""
        text = f"attempt {self.attempt} in pid {self.pid} from +{self.started - origin:.2f}s"
        killed = self.killed_by(kills)
        if self.cancelled and self.ended is not None:
            text += f", cancelled at +{self.ended - origin:.2f}s"
        elif self.ended is not None:
            text += f", END at +{self.ended - origin:.2f}s"
        else:
            text += ", no END"
        if killed is not None:
            text += f" (pid SIGKILLed at +{killed - origin:.2f}s)"
        return text


@dataclass(frozen=True)
class Parsed:
    """The executions file, as executions and the lines that made no sense."""

    executions: list[Execution]
    bad_lines: list[str]  # malformed lines, and END/CANCEL lines without a START


def parse(text: str) -> Parsed:
    """Pair each START with the first later END/CANCEL of the same job, attempt and pid."""
    executions: list[Execution] = []
    open_: dict[tuple[str, int, int], deque[Execution]] = defaultdict(deque)
    bad: list[str] = []
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) != 5 or parts[0] not in ("START", "END", "CANCEL"):
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
            closed.cancelled = kind == "CANCEL"
        else:
            bad.append(line)
    return Parsed(executions, bad)


@dataclass(frozen=True)
class JobRow:
    """The columns of a job's final row that the judgement needs."""

    id: str
    state: str
    attempt: int
    max_attempts: int
    last_error: str | None
    errors: Sequence[Mapping[str, Any]]

    @property
    def workers_lost(self) -> int:
        """Failed attempts that the rescuer recorded as lost with their worker."""
        return sum(1 for e in self.errors if str(e.get("error", "")).startswith(WORKER_LOST))

    def lost_at(self, attempt: int) -> float | None:
        """When the rescuer recorded this attempt as lost with its worker (epoch seconds)."""
        for entry in self.errors:
            if entry.get("attempt") == attempt and str(entry.get("error", "")).startswith(
                WORKER_LOST
            ):
                return datetime.fromisoformat(str(entry["at"])).timestamp()
        return None


@dataclass(frozen=True)
class Duplicate:
    """Two executions of the same attempt whose intervals overlap."""

    first: Execution
    second: Execution


@dataclass(frozen=True)
class Extra:
    """An execution beyond the one that counted for its job, and what explains it."""

    execution: Execution
    reason: str
    explained: bool


@dataclass
class Verdict:
    """What the executions say about the run; the test fails on what must not happen."""

    executions_per_job: Counter[int] = field(default_factory=Counter)
    executions: int = 0
    cut_short_by_kill: int = 0  # a START whose process was SIGKILLed before the END
    duplicates: list[Duplicate] = field(default_factory=list)
    overlapping_attempts: list[Duplicate] = field(default_factory=list)
    extras: list[Extra] = field(default_factory=list)
    # A SUCCEEDED job with no finished execution of its final attempt.
    succeeded_unrun: list[str] = field(default_factory=list)
    # Executions of jobs that were not submitted by this run.
    strangers: list[Execution] = field(default_factory=list)

    @property
    def explained(self) -> list[Extra]:
        """Extra executions that at-least-once delivery allows."""
        return [extra for extra in self.extras if extra.explained]

    @property
    def unexplained(self) -> list[Extra]:
        """Extra executions that should not have happened."""
        return [extra for extra in self.extras if not extra.explained]

    def reasons(self, explained: bool) -> Counter[str]:
        """How many extra executions each kind of reason covers."""
        return Counter(
            re.sub(r"[+-]?\d+\.\d+s", "T", e.reason)
            for e in self.extras
            if e.explained == explained
        )


def _counted(
    row: JobRow, runs: Sequence[Execution], kills: Mapping[int, float]
) -> Execution | None:
    """The execution whose outcome the job's row shows: a finished run of its last attempt."""
    if row.state != "SUCCEEDED":
        return None
    finished = [r for r in runs if r.attempt == row.attempt and r.finished]
    # Prefer a process that was never killed: its outcome is the one that got written.
    finished.sort(key=lambda r: (r.killed_by(kills) is not None, r.started))
    return finished[0] if finished else None


def _explain(
    run: Execution, row: JobRow, kills: Mapping[int, float], origin: float
) -> tuple[str, bool]:
    """Why an execution that did not count happened, and whether that is allowed.

    Allowed (at-least-once): the process was SIGKILLed, before the rescuer took
    the attempt back if it did; and a hand-back by a stopping worker. Not allowed:
    anything that ran again although its worker was alive.
    """
    killed = run.killed_by(kills)
    lost = row.lost_at(run.attempt)
    if lost is not None and (killed is None or killed > lost):
        # The rescuer declared the attempt lost while its worker was alive.
        what = "dropped it (CANCEL)" if run.cancelled else "was still on it"
        later = f", SIGKILLed only at +{killed - origin:.2f}s" if killed is not None else ""
        return (
            f"lease declared lost at +{lost - origin:.2f}s while its live worker {what}{later}",
            False,
        )
    if run.cancelled:
        return "handed back by its stopping worker", True
    if killed is not None:
        if run.ended is None:
            return "cut short by SIGKILL", True
        return "finished, but its worker was SIGKILLed before the outcome was written", True
    if run.ended is None:
        return "no END although its process was never killed", False
    return "finished in a live worker, yet the job ran again", False


def judge(
    executions: Iterable[Execution],
    rows: Mapping[str, JobRow],
    kills: Mapping[int, float],
    origin: float = 0.0,
) -> Verdict:
    """Judge every execution of the submitted jobs (``rows``, keyed by job id).

    ``kills`` maps the pid of every process the run SIGKILLed to the time of the kill;
    ``origin`` is the time that messages show as +0s.
    Jobs that are not terminal get no extra-execution verdict: they are reported
    as lost instead.
    """
    verdict = Verdict()
    by_job: dict[str, list[Execution]] = defaultdict(list)
    for run in executions:
        verdict.executions += 1
        if run.ended is None and run.killed_by(kills) is not None:
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
                if second.started >= first.until(kills):
                    continue
                if first.attempt == second.attempt:
                    verdict.duplicates.append(Duplicate(first, second))
                else:
                    verdict.overlapping_attempts.append(Duplicate(first, second))
        if row.state not in TERMINAL:
            continue
        counted = _counted(row, runs, kills)
        if row.state == "SUCCEEDED" and counted is None:
            verdict.succeeded_unrun.append(job_id)
        for run in runs:
            if run is not counted:
                reason, explained = _explain(run, row, kills, origin)
                verdict.extras.append(Extra(run, reason, explained))
    return verdict
