"""NATS as Orchestrix uses it: the connection and the subjects.

PostgreSQL holds every job; nothing on NATS is the record. A worker
claims its jobs from the database, and NATS carries what makes that fast:

- ``<prefix>.wake``: jobs were created; a worker with free slots claims now
  instead of at its next poll.
- ``<prefix>_cancel``: the API asks the worker running a job to stop it (its
  lease renewal would find the request anyway).
- ``<prefix>.workers.<id>``: the lifeline asks a worker that seems dead whether
  it is there; NATS answers "no responders" once its connection is gone.
- ``<prefix>.handbacks``: the one durable thing, a JetStream stream where a
  worker that must exit while PostgreSQL is away returns its unfinished
  attempts (``orchestrix.handbacks``).

A lost message delays something by at most a poll or a lease renewal; a
duplicate is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats import errors
from nats.aio.client import Client
from nats.errors import NoServersError

from orchestrix import transport
from orchestrix.backoff import until_connected
from orchestrix.settings import NatsSettings

log = logging.getLogger("broker")


def wake_subject(settings: NatsSettings) -> str:
    return f"{settings.subject_prefix}.wake"


def cancel_subject(settings: NatsSettings) -> str:
    """Core NATS subject on which the API asks workers to stop a job."""
    return f"{settings.subject_prefix}_cancel"


def worker_subject(settings: NatsSettings, worker_id: str) -> str:
    """Where a worker answers the lifeline's "are you there?"."""
    return f"{settings.subject_prefix}.workers.{worker_id}"


async def connect(settings: NatsSettings, name: str, **callbacks: Any) -> Client:
    """Connect to any of the servers, and keep reconnecting forever, to any of them.

    A NATS restart, or the loss of one node of a cluster, must not end the
    process. nats-py tries the servers in random order, so processes spread over
    a cluster's nodes, and it adds the nodes a server tells it about. TLS and
    credentials come from ``settings`` (orchestrix.transport). A first connection
    that the servers refuse (credentials, certificates) raises
    :class:`~orchestrix.transport.Refused` instead of retrying forever; once
    connected, a refusal on a reconnect is logged and retried (the credentials
    may be on their way back).
    """
    # nats-py retries a first connection forever too, and some refusals (a
    # certificate that does not verify) reach only its error callback, outside
    # the connect call: the first refusal ends the attempt from here.
    refusal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    theirs = callbacks.pop("error_cb", None)

    async def on_error(exc: Exception) -> None:
        if not refusal.done() and not client.is_connected and transport.refused(exc):
            refusal.set_result(exc)
            return
        if theirs is not None:
            await theirs(exc)
            return
        # One line instead of nats-py's traceback; nats-py's errors name no credentials.
        log.warning("nats connection error", extra={"error": repr(exc)})

    client = Client()
    connecting = asyncio.ensure_future(
        client.connect(
            list(settings.servers),
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=on_error,
            **transport.nats_options(settings),
            **callbacks,
        )
    )
    try:
        waiting: list[asyncio.Future[Any]] = [connecting, refusal]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        with contextlib.suppress(Exception):
            await client.close()
        exc = refusal.result()
        raise transport.Refused(
            f"NATS refused the connection (credentials: {settings.auth.method}; "
            f"TLS {'on' if settings.tls is not None else 'off'}): {exc}"
        )
    await connecting  # its exception, if it failed otherwise
    return client


async def connect_with_backoff(
    settings: NatsSettings, name: str, stop: asyncio.Event, **callbacks: Any
) -> Client | None:
    """Connect once NATS answers; None if stopped first."""
    try:
        return await until_connected(
            lambda: connect(settings, name, **callbacks),
            what="nats",
            stop=stop,
            retry_on=(OSError, TimeoutError, NoServersError),
        )
    except transport.Refused as exc:
        log.error("nats refused; not retrying", extra={"error": str(exc)})
        raise


async def disconnect(nc: Client) -> None:
    """Drain the connection (what is in flight goes out) and close it.

    While NATS is away the connection is reconnecting, and drain() refuses it
    (or fails half-way if NATS goes meanwhile): then it is closed as it is. A
    process stopping during a NATS outage must still exit cleanly.
    """
    try:
        await nc.drain()
    except errors.Error as exc:
        log.warning("nats not drained; closing", extra={"error": repr(exc)})
        try:
            await nc.close()
        except asyncio.CancelledError as closing:
            # nats-py waits on its transport's close, a future its own reconnect
            # loop may cancel (seen in CI): that is no cancel of ours, and the exit
            # must go on. A cancel of this task itself still goes through.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.warning("nats connection not closed cleanly", extra={"error": repr(closing)})
        except Exception as closing:  # nats-py writes to a transport already closed
            log.warning("nats connection not closed cleanly", extra={"error": repr(closing)})
