"""Schema migrations: alembic, driven from code so no alembic.ini is needed.

The revisions live in the ``orchestrix.migrations`` package (the repository's
``migrations/`` folder), so an installed wheel carries them into a container.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# By import name, not by path: in an installed wheel the revisions sit in site-packages.
MIGRATIONS_DIR = Path(str(files("orchestrix.migrations")))
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,59}$")


def _config(database_url: str | None = None, directory: Path = MIGRATIONS_DIR) -> Config:
    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["database_url"] = database_url
    return config


class ConnectError(Exception):
    """PostgreSQL could not be reached or refused us: libpq's own message."""


@contextmanager
def _connection_errors() -> Iterator[None]:
    try:
        yield
    except sqlalchemy.exc.OperationalError as exc:
        # SQLAlchemy wraps libpq's message in its own lines (the statement, a
        # link); the first line of the original is the one that says what failed.
        original = str(exc.orig).strip().splitlines() if exc.orig is not None else [str(exc)]
        raise ConnectError(" ".join(line.strip() for line in original)) from None


def up(database_url: str, revision: str = "head") -> None:
    """``database_url`` is a libpq URI: sslmode, sslrootcert, sslcert, sslkey and
    the password in it apply, as in the services (DatabaseSettings.url)."""
    with _connection_errors():
        command.upgrade(_config(database_url), revision)


def down(database_url: str, revision: str = "-1") -> None:
    with _connection_errors():
        command.downgrade(_config(database_url), revision)


def heads(directory: Path = MIGRATIONS_DIR) -> list[str]:
    return list(ScriptDirectory.from_config(_config(directory=directory)).get_heads())


def create(name: str, directory: Path = MIGRATIONS_DIR) -> Path:
    """Write an empty revision numbered after the newest one; return its path."""
    if not _NAME.match(name):
        raise ValueError(f"migration name {name!r}: use lowercase letters, digits and underscores")
    config = _config(directory=directory)
    script = ScriptDirectory.from_config(config)
    numbers = [int(rev.revision) for rev in script.walk_revisions() if rev.revision.isdigit()]
    rev_id = f"{max(numbers, default=0) + 1:04d}"
    written = command.revision(config, message=name.replace("_", " "), rev_id=rev_id)
    if written is None or isinstance(written, list):
        raise RuntimeError("alembic wrote no single revision")
    return Path(written.path)
