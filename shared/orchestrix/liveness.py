"""How fast a dead worker is noticed, and why a live one is never taken for dead.

Two sides keep one promise (no two attempts of a job run at once):

- A worker (services/worker/heartbeat.py) checks PostgreSQL and NATS every
  BEAT_S. When neither has answered it for CUT_OFF_S, it stops every job it runs.
- The scheduler's lifeline (services/scheduler/lifeline.py) looks every
  LOOK_EVERY_S for workers whose PostgreSQL session is gone *and* for which NATS
  says "no responders". Only a worker seen so at every look for CONFIRM_S loses
  its jobs. By then, if the process is alive at all, neither PostgreSQL nor NATS
  has answered it for longer than CUT_OFF_S, so it has stopped them.

A SIGKILLed worker's session and NATS connection close at once: its jobs run
again about CONFIRM_S + LOOK_EVERY_S after the kill.
"""

from __future__ import annotations

BEAT_S = 0.5
CUT_OFF_S = 1.5
LOOK_EVERY_S = 0.5
CONFIRM_S = 3.5

# The look that sees a worker gone may come up to a look late, and a gap between
# two looks could hide a moment it was back.
assert CONFIRM_S > CUT_OFF_S + 2 * LOOK_EVERY_S
