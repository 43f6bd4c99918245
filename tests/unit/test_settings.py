from __future__ import annotations

import pytest
from orchestrix.settings import (
    ApiSettings,
    DatabaseSettings,
    LogSettings,
    NatsSettings,
    Settings,
    SettingsError,
)


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database.url == (
        "postgresql://orchestrix@localhost:5432/orchestrix?sslmode=disable"
    )
    assert settings.nats.url == "nats://127.0.0.1:4222"
    assert settings.api.port == 8080
    assert settings.api.max_body_bytes == 1024 * 1024
    assert settings.log == LogSettings(format="text", level="INFO")


def test_seed_db_variables_build_the_url() -> None:
    db = DatabaseSettings.from_env(
        {
            "DB_HOST": "db.internal",
            "DB_PORT": "5434",
            "DB_USER": "orchestrix",
            "DB_PASSWORD": "p@ss/word",
            "DB_NAME": "orchestrix_dev",
            "DB_SSLMODE": "require",
        }
    )
    assert db.url == (
        "postgresql://orchestrix:p%40ss%2Fword@db.internal:5434/orchestrix_dev?sslmode=require"
    )


def test_database_url_overrides_the_parts() -> None:
    db = DatabaseSettings.from_env(
        {"DATABASE_URL": "postgresql://u@h:1/d", "DB_HOST": "ignored", "DB_PORT": "not-a-port"}
    )
    assert db.url == "postgresql://u@h:1/d"


@pytest.mark.parametrize(
    ("env", "variable", "message"),
    [
        ({"API_PORT": "abc"}, "API_PORT", "must be an integer, got 'abc'"),
        ({"API_PORT": "70000"}, "API_PORT", "must be between 1 and 65535, got 70000"),
        ({"DB_PORT": "0"}, "DB_PORT", "must be between 1 and 65535"),
        ({"DB_SSLMODE": "maybe"}, "DB_SSLMODE", "must be one of disable, allow"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL", "must start with postgresql://"),
        ({"NATS_URL": "http://x"}, "NATS_URL", "must start with nats://"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "must be one of text, json"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "must be one of debug"),
        ({"API_MAX_BODY_BYTES": "10"}, "API_MAX_BODY_BYTES", "must be between 1024"),
        ({"DB_POOL_MAX_SIZE": "0"}, "DB_POOL_MAX_SIZE", "must be between 1 and 1000"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert message in str(caught.value)


def test_blank_means_default() -> None:
    assert ApiSettings.from_env({"API_PORT": "  "}).port == 8080


def test_values_are_read() -> None:
    assert ApiSettings.from_env({"API_PORT": "9000", "API_MAX_BODY_BYTES": "2048"}) == (
        ApiSettings(host="0.0.0.0", port=9000, max_body_bytes=2048)
    )
    assert NatsSettings.from_env({"NATS_URL": "nats://n:4222"}).url == "nats://n:4222"
    assert LogSettings.from_env({"LOG_FORMAT": "JSON", "LOG_LEVEL": "debug"}) == LogSettings(
        format="json", level="DEBUG"
    )
