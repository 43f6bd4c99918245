"""NATS decentralized auth for tests: an operator, an account and users, as JWTs.

nats-server in operator mode trusts one operator's public key; the operator signs
account JWTs (given to the server through ``resolver: MEMORY`` and
``resolver_preload``), an account signs its users' JWTs, and a client proves it
is a user by presenting the user JWT and signing the server's nonce with the
user's NKey seed. A creds file holds that JWT and that seed. Only what these
tests need is encoded here (no signing keys, imports, exports or permissions).

A NATS JWT is ``header.claims.signature``, each part base64url without padding:
the header says ``{"typ": "JWT", "alg": "ed25519-nkey"}``, the claims are JSON
with the issuer's and the subject's public NKeys, and the signature is the
issuer's ed25519 signature of ``header.claims``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

# -1 is "no limit" in every NATS limit; a limit left out would be 0 (none allowed).
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
_ACCOUNT_LIMITS = {
    **_UNLIMITED,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
# JetStream for the account (the hand-back ledger): storage limits other than 0.
_JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Identity:
    """An NKey pair: the seed (secret) and its public key."""

    seed: bytes
    public_key: str

    @classmethod
    def make(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(bytearray(self.seed)).sign(data)
        return signature


def encode_jwt(issuer: Identity, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A JWT of ``nats`` claims about ``subject``, signed by ``issuer``."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # The JWT id: a hash of the claims without it (the server does not check it).
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


@dataclass(frozen=True)
class Operator:
    """An operator with one account for the clients (with JetStream) and the system
    account (which JetStream needs in operator mode), their JWTs, and a server
    configuration for them."""

    operator: Identity
    account: Identity
    system: Identity
    operator_jwt: str
    account_jwt: str
    system_jwt: str

    @classmethod
    def make(cls, account_name: str = "ORX") -> Operator:
        operator = Identity.make(nkeys.PREFIX_BYTE_OPERATOR)
        account = Identity.make(nkeys.PREFIX_BYTE_ACCOUNT)
        system = Identity.make(nkeys.PREFIX_BYTE_ACCOUNT)
        operator_jwt = encode_jwt(
            operator,
            operator.public_key,
            "test-operator",
            {"type": "operator", "system_account": system.public_key},
        )
        account_jwt = encode_jwt(
            operator,
            account.public_key,
            account_name,
            {"type": "account", "limits": {**_ACCOUNT_LIMITS, **_JETSTREAM_LIMITS}},
        )
        system_jwt = encode_jwt(
            operator, system.public_key, "SYS", {"type": "account", "limits": _ACCOUNT_LIMITS}
        )
        return cls(operator, account, system, operator_jwt, account_jwt, system_jwt)

    def server_config(self) -> str:
        """The nats-server configuration that trusts this operator and knows its accounts."""
        return textwrap.dedent(
            f"""\
            operator: {self.operator_jwt}
            system_account: {self.system.public_key}
            resolver: MEMORY
            resolver_preload: {{
              {self.account.public_key}: {self.account_jwt}
              {self.system.public_key}: {self.system_jwt}
            }}
            """
        )

    def user_creds(self, folder: Path, name: str, *, signer: Identity | None = None) -> Path:
        """A creds file for a new user of the account (or one signed by ``signer``,
        which the server does not trust), as ``nsc`` writes them."""
        user = Identity.make(nkeys.PREFIX_BYTE_USER)
        token = encode_jwt(
            signer or self.account,
            user.public_key,
            name,
            {"type": "user", "pub": {}, "sub": {}, **_UNLIMITED},
        )
        path = folder / f"{name}.creds"
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{token}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path
