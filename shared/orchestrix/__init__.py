"""Orchestrix: a job orchestration engine.

This package is the library every Orchestrix process shares and the SDK user
code imports::

    from orchestrix import executor, PermanentError
"""

from __future__ import annotations

from orchestrix.errors import InvalidPayload, PermanentError
from orchestrix.executors import JobContext, Snooze, executor

__all__ = ["InvalidPayload", "JobContext", "PermanentError", "Snooze", "executor"]
__version__ = "0.1.0"
