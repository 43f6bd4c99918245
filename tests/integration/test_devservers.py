"""The embedded PostgreSQL and NATS servers start, answer real clients, keep data across
restarts of the same data dir, and leave no process behind when stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import nats
import pytest
from orchestrix.devservers import EmbeddedNats, EmbeddedPostgres

pytestmark = pytest.mark.timeout(120)


async def _pg_exec(url: str, *statements: str) -> list[object]:
    conn = await asyncpg.connect(url)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


async def _nats_roundtrip(url: str, *, create_stream: bool) -> tuple[bool, list[str]]:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.account_info()
        if create_stream:
            await js.add_stream(name="DEVSERVERS", subjects=["devservers.>"])
            await js.publish("devservers.one", b"kept")
        names = [stream.config.name for stream in await js.streams_info()]
        return info is not None, sorted(name for name in names if name is not None)
    finally:
        await nc.close()


def test_postgres_starts_keeps_data_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    pg = EmbeddedPostgres(data_dir)
    try:
        url = pg.start()
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert url == pg.url
        assert pg.port not in (None, 5432)
        assert asyncio.run(
            _pg_exec(
                url,
                "CREATE TABLE kept (id int PRIMARY KEY)",
                "INSERT INTO kept VALUES (42) RETURNING id",
                "SELECT 1",
            )
        ) == [None, 42, 1]
    finally:
        pg.stop()
    first = pg.process
    assert first is not None
    assert first.poll() is not None
    pg.stop()  # idempotent

    again = EmbeddedPostgres(data_dir)
    try:
        url = again.start()
        assert asyncio.run(_pg_exec(url, "SELECT id FROM kept")) == [42]
    finally:
        again.stop()
    assert again.process is not None
    assert again.process.poll() is not None
    assert (data_dir / "server.log").stat().st_size > 0


def test_postgres_restarts_after_being_killed(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    pg = EmbeddedPostgres(data_dir)
    try:
        asyncio.run(_pg_exec(pg.start(), "CREATE TABLE survived (id int)"))
        assert pg.process is not None
        pg.stop(timeout_s=0)  # straight to SIGKILL: leaves a stale postmaster.pid behind
        assert pg.process.poll() is not None
        assert (data_dir / "pgdata" / "postmaster.pid").exists()

        assert asyncio.run(_pg_exec(pg.start(), "SELECT count(*) FROM survived")) == [0]
    finally:
        pg.stop()
    assert pg.process is not None
    assert pg.process.poll() is not None


def test_nats_starts_keeps_streams_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "nats"
    server = EmbeddedNats(data_dir)
    try:
        url = server.start()
        assert url.startswith("nats://127.0.0.1:")
        assert server.port not in (None, 4222)
        assert asyncio.run(_nats_roundtrip(url, create_stream=True)) == (True, ["DEVSERVERS"])
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.poll() is not None
    server.stop()  # idempotent

    try:
        url = server.start()
        assert asyncio.run(_nats_roundtrip(url, create_stream=False)) == (True, ["DEVSERVERS"])
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert (data_dir / "nats.log").stat().st_size > 0


def test_url_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _ = EmbeddedPostgres(tmp_path / "pg").url
    with pytest.raises(RuntimeError):
        _ = EmbeddedNats(tmp_path / "nats").url
