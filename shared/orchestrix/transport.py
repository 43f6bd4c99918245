"""How a process secures its connection to NATS: TLS and credentials, from NatsSettings.

PostgreSQL needs nothing here: its TLS parameters and password travel in the one
libpq URL (``DatabaseSettings.url``) that asyncpg and libpq read alike. NATS's
travel as keyword arguments of ``nats.connect``, built here, and so does the
judgement of which failures to connect are worth waiting out: a server that is
away is, a refused credential or a certificate that does not verify is not
(waiting cannot fix them, and the process should say so and stop).
"""

from __future__ import annotations

import ssl
from typing import Any

from orchestrix.settings import NatsSettings, NatsTls


def nats_tls_context(tls: NatsTls) -> ssl.SSLContext:
    """Verify the servers against ``ca_file`` (the system's CAs without one), by
    certificate and name; present the client certificate when one is given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def nats_options(settings: NatsSettings) -> dict[str, Any]:
    """The keyword arguments of ``nats.connect`` for TLS and authentication."""
    options: dict[str, Any] = {}
    if settings.tls is not None:
        options["tls"] = nats_tls_context(settings.tls)
    auth = settings.auth
    if auth.user is not None:
        options["user"] = auth.user
        options["password"] = auth.password
    elif auth.token is not None:
        options["token"] = auth.token
    elif auth.nkey_seed_file is not None:
        options["nkeys_seed"] = auth.nkey_seed_file
    elif auth.creds_file is not None:
        options["user_credentials"] = auth.creds_file
    return options


class Refused(Exception):
    """A server and this process do not accept each other: the server's
    certificate does not verify, or the server refused our credentials or our
    client certificate. Retrying cannot help; the message says which server and
    why, never the credentials."""


def refused(exc: BaseException) -> bool:
    """Whether a failure to connect is one that retrying cannot cure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, ssl.SSLError) and "certificate" in str(exc).lower():
        return True  # the server refused our client certificate, or wanted one
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text
