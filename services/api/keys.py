"""Typed keys for what the API application holds: no module-level state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from orchestrix.metrics import ApiMetrics
from orchestrix.services.api.creator import Creator
from orchestrix.services.api.feed import Feed
from orchestrix.settings import AuthSettings, NatsSettings

POOL: web.AppKey[Any] = web.AppKey("pool")  # an asyncpg.Pool; asyncpg ships no types
METRICS = web.AppKey("metrics", ApiMetrics)
CREATOR = web.AppKey("creator", Creator)
FEED = web.AppKey("feed", Feed)
NATS_SETTINGS = web.AppKey("nats_settings", NatsSettings)
LIST_MAX_BYTES = web.AppKey("list_max_bytes", int)  # API_LIST_MAX_BYTES
AUTH = web.AppKey("auth_settings", AuthSettings)  # API_AUTH and the rest


@dataclass
class Lifecycle:
    """Draining from the moment shutdown starts: /ready answers 503 from then on."""

    draining: bool = False
    # The NATS connection, once made; the API only reports on it in /ready.
    nats: Client | None = None


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
