"""Alembic revisions for the Orchestrix schema, in plain SQL, one concern each.

Run them with ``orchestrix migrate up|down|create NAME`` (or the make targets).
"""
