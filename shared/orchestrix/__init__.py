"""Orchestrix: a job orchestration engine.

This package is the library every Orchestrix process shares and the SDK user
code imports: settings, ids, the job state machine, database access, metrics.
"""

from __future__ import annotations

__version__ = "0.1.0"
