from __future__ import annotations

from pathlib import Path

import pytest
from orchestrix.settings import (
    ApiSettings,
    DatabaseSettings,
    LogSettings,
    NatsSettings,
    NatsTls,
    RetentionSettings,
    RetrySettings,
    Settings,
    SettingsError,
    WorkerSettings,
    describe,
)


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database.url == (
        "postgresql://orchestrix@localhost:5432/orchestrix?sslmode=disable"
    )
    assert settings.nats.servers == ("nats://127.0.0.1:4222",)
    assert settings.api.port == 8080
    assert settings.api.max_body_bytes == 1024 * 1024
    assert settings.api.shutdown_timeout_s == 30.0
    assert settings.worker.shutdown_timeout_s == 30.0
    assert settings.retry == RetrySettings(base_delay_s=1.0, max_delay_s=300.0)
    assert settings.log == LogSettings(format="text", level="INFO")
    assert settings.retention == RetentionSettings(
        succeeded_s=86400.0, cancelled_s=86400.0, failed_s=7 * 86400.0
    )


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
        ({"API_SHUTDOWN_TIMEOUT": "soon"}, "API_SHUTDOWN_TIMEOUT", "must be a duration"),
        ({"RETRY_BASE_DELAY": "0"}, "RETRY_BASE_DELAY", "must be between 0.001s and 86400s"),
        # Renewed every third of it, a shorter lease would outrun the heartbeat.
        ({"LEASE_TIMEOUT": "1s"}, "LEASE_TIMEOUT", "must be between 2s and 3600s"),
        ({"RETENTION_SUCCEEDED": "a day"}, "RETENTION_SUCCEEDED", "must be a duration"),
        ({"RETENTION_CANCELLED": "-1h"}, "RETENTION_CANCELLED", "must be a duration"),
        ({"RETENTION_FAILED": "3651d"}, "RETENTION_FAILED", "must be between 0s and 3650d"),
        (
            {"RETRY_BASE_DELAY": "10s", "RETRY_MAX_DELAY": "5s"},
            "RETRY_MAX_DELAY",
            "must be at least RETRY_BASE_DELAY (10s)",
        ),
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
    assert ApiSettings.from_env(
        {"API_PORT": "9000", "API_MAX_BODY_BYTES": "2048", "API_SHUTDOWN_TIMEOUT": "5s"}
    ) == ApiSettings(host="0.0.0.0", port=9000, max_body_bytes=2048, shutdown_timeout_s=5.0)
    assert RetrySettings.from_env({"RETRY_BASE_DELAY": "500ms", "RETRY_MAX_DELAY": "1m"}) == (
        RetrySettings(base_delay_s=0.5, max_delay_s=60.0)
    )
    assert NatsSettings.from_env({"NATS_URL": "nats://n:4222"}).servers == ("nats://n:4222",)
    assert LogSettings.from_env({"LOG_FORMAT": "JSON", "LOG_LEVEL": "debug"}) == LogSettings(
        format="json", level="DEBUG"
    )


def test_each_process_reads_its_own_shutdown_timeout() -> None:
    """The API drains for API_SHUTDOWN_TIMEOUT, a worker for SHUTDOWN_TIMEOUT."""
    worker_only = Settings.from_env({"SHUTDOWN_TIMEOUT": "2m"})
    assert (worker_only.api.shutdown_timeout_s, worker_only.worker.shutdown_timeout_s) == (30, 120)
    api_only = Settings.from_env({"API_SHUTDOWN_TIMEOUT": "10s"})
    assert (api_only.api.shutdown_timeout_s, api_only.worker.shutdown_timeout_s) == (10, 30)


def test_retry_delays_are_their_own_concern() -> None:
    """The worker's completer and the scheduler's rescuer both read Settings.retry."""
    settings = Settings.from_env({"RETRY_BASE_DELAY": "2s", "RETRY_MAX_DELAY": "1h"})
    assert settings.retry == RetrySettings(base_delay_s=2.0, max_delay_s=3600.0)
    assert not {"retry_base_delay_s", "retry_max_delay_s"} & set(vars(WorkerSettings()))


def test_the_variable_table_lists_the_new_variables() -> None:
    table = describe(("API_SHUTDOWN_TIMEOUT", "SHUTDOWN_TIMEOUT", "RETRY_BASE_DELAY"))
    assert "  API_SHUTDOWN_TIMEOUT  how long a stopping API lets requests in flight finish" in table
    assert "(and the API its requests)" not in table
    assert "RETRY_BASE_DELAY" in table


def test_nats_url_takes_the_nodes_of_a_cluster() -> None:
    nats = NatsSettings.from_env(
        {
            "NATS_URL": "nats://n1:4222, nats://user:pw@n2:4222 ,tls://n3",
        }
    )
    assert nats.servers == ("nats://n1:4222", "nats://user:pw@n2:4222", "tls://n3")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nats://a:4222,,nats://c:4222", "entry 2 of 3 is empty"),
        ("nats://a:4222,", "entry 2 of 2 is empty"),
        ("nats://a:4222,b:4222", "entry 2 of 2 must start with nats:// or tls://, (not shown"),
        ("nats://a:4222,http://b", "entry 2 of 2 must start with nats:// or tls://"),
        ("nats://a:4222 nats://b:4222", "the URL holds a space"),
        ("nats://a:42x2", "the URL has a port that is not a number"),
        ("nats://a:70000", "the URL has a port that is not a number"),
        ("nats://a:0", "the URL has a port that is not a number"),
        ("nats://:4222", "the URL has no host"),
        ("nats://a:4222;nats://b:4222", "the URL has a port that is not a number"),
        ("nats://a:4222/jobs", "must be only scheme://[user[:password]@]host[:port]"),
    ],
)
def test_a_bad_nats_url_entry_is_named(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        NatsSettings.from_env({"NATS_URL": value})
    assert caught.value.variable == "NATS_URL"
    assert str(caught.value).startswith("NATS_URL: ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("env", "secret", "shown"),
    [
        ({"NATS_URL": "nats://a:4222,nats://bob:hunter2@b:x"}, "hunter2", "nats://bob:***@b:x"),
        ({"NATS_URL": "nats://a:4222,http://bob:hunter2@b"}, "hunter2", "http://bob:***@b"),
        ({"NATS_URL": "nats://bob:p@ss/w0rd@b:x"}, "w0rd", "nats://bob:***@b:x"),
        # A user part alone is a NATS token.
        ({"NATS_URL": "nats://s3cr3t-token@b:x"}, "s3cr3t-token", "nats://***@b:x"),
    ],
)
def test_a_bad_url_does_not_show_its_credentials(
    env: dict[str, str], secret: str, shown: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert secret not in str(caught.value)
    assert repr(shown) in str(caught.value)


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"DATABASE_URL": "mysql://root:hunter2@db/x"}, "got a mysql:// URL"),
        # A secret pasted into the wrong variable: nothing of it is shown.
        ({"DATABASE_URL": "hunter2"}, "the value is not shown"),
        ({"DATABASE_URL": "postgresql://root:hunter2@db:port/x"}, "port that is not a number"),
        ({"DATABASE_URL": "postgresql://root:hunter2@db/x?sslmode=yes"}, "sslmode must be"),
        ({"NATS_URL": "hunter2"}, "(not shown: no scheme)"),
        ({"NATS_URL": "bob:hunter2@b:4222"}, "(not shown: no scheme)"),
        ({"DATABASE_URL": "postgresql://u:hunter2@db/x", "DB_PASSWORD": "hunter2"}, "once"),
    ],
)
def test_a_bad_database_url_shows_nothing_of_its_secrets(env: dict[str, str], shown: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert "hunter2" not in str(caught.value)
    assert shown in str(caught.value)


def test_secrets_come_from_files_and_never_from_both(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("s3cret pw\n")
    (tmp_path / "nats").write_text("n-pw")
    (tmp_path / "token").write_text("tok\r\n")
    settings = Settings.from_env(
        {
            "DB_PASSWORD_FILE": str(tmp_path / "db"),
            "NATS_USER": "orx",
            "NATS_PASSWORD_FILE": str(tmp_path / "nats"),
        }
    )
    assert settings.database.url.startswith("postgresql://orchestrix:s3cret%20pw@localhost")
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings.database.shown_url
    assert settings.nats.auth.password == "n-pw"
    assert "n-pw" not in repr(settings)
    assert NatsSettings.from_env({"NATS_TOKEN_FILE": str(tmp_path / "token")}).auth.token == "tok"
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://u:pw@h:1/d\n")
    assert DatabaseSettings.from_env({"DATABASE_URL_FILE": str(url_file)}).url == (
        "postgresql://u:pw@h:1/d"
    )
    for variable, value in (
        ("DB_PASSWORD", "x"),
        ("NATS_PASSWORD", "x"),
        ("NATS_TOKEN", "x"),
        ("DATABASE_URL", "postgresql://h/d"),
    ):
        with pytest.raises(SettingsError, match=rf"^{variable}_FILE: {variable} is set too"):
            Settings.from_env(
                {variable: value, f"{variable}_FILE": str(tmp_path / "db"), "NATS_USER": "u"}
            )
    with pytest.raises(SettingsError, match=r"^DB_PASSWORD_FILE: cannot read .*missing"):
        Settings.from_env({"DB_PASSWORD_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match=r"^NATS_TOKEN_FILE: .* is empty"):
        Settings.from_env({"NATS_TOKEN_FILE": str(tmp_path / "empty")})


def test_database_tls_parameters(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    db = DatabaseSettings.from_env(
        {"DB_HOST": "db.internal", "DB_SSLMODE": "verify-full", "DB_SSLROOTCERT": str(ca)}
    )
    assert db.url == (
        f"postgresql://orchestrix@db.internal:5432/orchestrix?sslmode=verify-full&sslrootcert={ca}"
    )
    assert db.sslmode == "verify-full"
    # With a URL, the variables add to its query; one given in both places is an error.
    db = DatabaseSettings.from_env(
        {
            "DATABASE_URL": "postgresql://u@h/d?sslmode=verify-ca",
            "DB_SSLROOTCERT": str(ca),
            "DB_PASSWORD": "pw",
        }
    )
    assert db.url == f"postgresql://u:pw@h/d?sslmode=verify-ca&sslrootcert={ca}"
    problems = [
        ({"DB_SSLMODE": "verify-full"}, "DB_SSLROOTCERT: is needed with sslmode verify-full"),
        ({"DB_SSLMODE": "verify-ca"}, "DB_SSLROOTCERT: is needed"),
        ({"DB_SSLROOTCERT": str(ca)}, "DB_SSLROOTCERT: is used only with sslmode require"),
        (
            {"DB_SSLMODE": "verify-full", "DB_SSLROOTCERT": str(tmp_path / "nope")},
            "DB_SSLROOTCERT: cannot read",
        ),
        ({"DB_SSLMODE": "require", "DB_SSLCERT": str(ca)}, "DB_SSLKEY: a client certificate"),
        ({"DB_SSLMODE": "require", "DB_SSLKEY": str(ca)}, "DB_SSLCERT: a client certificate"),
        ({"DB_SSLCERT": str(ca), "DB_SSLKEY": str(ca)}, "DB_SSLCERT: a client certificate needs"),
        (
            {"DATABASE_URL": "postgresql://h/d?sslmode=require", "DB_SSLMODE": "verify-full"},
            "DB_SSLMODE: DATABASE_URL sets sslmode too",
        ),
        (
            {"DATABASE_URL": "postgresql://u:pw@h/d", "DB_PASSWORD": "pw2"},
            "DB_PASSWORD: DATABASE_URL holds a password too",
        ),
        (
            {"DATABASE_URL": "postgresql://h/d?sslmode=verify-full"},
            "DB_SSLROOTCERT (or sslrootcert in DATABASE_URL): is needed",
        ),
    ]
    for env, message in problems:
        with pytest.raises(SettingsError) as caught:
            DatabaseSettings.from_env(env)
        assert str(caught.value).startswith(message), (env, str(caught.value))


def test_nats_authentication_and_tls(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.write_text("SU...")
    assert NatsSettings.from_env({}).tls is None
    assert NatsSettings.from_env({"NATS_URL": "tls://h:4222"}).tls == NatsTls()
    nats = NatsSettings.from_env(
        {"NATS_NKEY_SEED": str(seed), "NATS_TLS_CA": str(seed), "NATS_URL": "nats://h:1"}
    )
    assert nats.auth.method == "nkey"
    assert nats.tls == NatsTls(ca_file=str(seed))
    problems = [
        ({"NATS_USER": "u"}, "NATS_PASSWORD: NATS_USER and NATS_PASSWORD go together"),
        ({"NATS_PASSWORD": "p"}, "NATS_USER: NATS_USER and NATS_PASSWORD go together"),
        ({"NATS_TOKEN": "t", "NATS_CREDS": str(seed)}, "NATS_CREDS: NATS_TOKEN is set too"),
        ({"NATS_CREDS": str(tmp_path / "none")}, "NATS_CREDS: cannot read"),
        ({"NATS_TLS_CERT": str(seed)}, "NATS_TLS_KEY: a client certificate needs"),
        (
            {"NATS_TOKEN": "t", "NATS_URL": "nats://u:p@h:1"},
            "NATS_TOKEN: NATS_URL holds credentials too",
        ),
    ]
    for env, message in problems:
        with pytest.raises(SettingsError) as caught:
            NatsSettings.from_env(env)
        assert str(caught.value).startswith(message), (env, str(caught.value))
        assert "SU..." not in str(caught.value)


def test_demo_executors_are_off_unless_switched_on() -> None:
    assert WorkerSettings.from_env({}).demo_executors is False
    assert WorkerSettings.from_env({"WORKER_DEMO_EXECUTORS": "true"}).demo_executors is True
    with pytest.raises(SettingsError, match=r"^WORKER_DEMO_EXECUTORS: must be true or false"):
        WorkerSettings.from_env({"WORKER_DEMO_EXECUTORS": "sometimes"})


def test_retention_is_read_per_state_and_zero_keeps_forever() -> None:
    assert RetentionSettings.from_env(
        {"RETENTION_SUCCEEDED": "30s", "RETENTION_CANCELLED": "0", "RETENTION_FAILED": "14d"}
    ) == RetentionSettings(succeeded_s=30.0, cancelled_s=0.0, failed_s=14 * 86400.0)
    # Each variable is its own: one set leaves the others at their defaults.
    assert RetentionSettings.from_env({"RETENTION_FAILED": "1h"}) == RetentionSettings(
        succeeded_s=86400.0, cancelled_s=86400.0, failed_s=3600.0
    )
    assert "RETENTION_FAILED" in describe(("RETENTION_FAILED",))
    assert "(default 7d)" in describe(("RETENTION_FAILED",))


def test_metrics_queues_and_the_list_page_limit_are_read() -> None:
    settings = Settings.from_env(
        {"METRICS_QUEUES": " emails, reports,emails ,", "API_LIST_MAX_BYTES": "65536"}
    )
    assert settings.metrics.queues == ("emails", "reports")
    assert settings.api.list_max_bytes == 65536
    defaults = Settings.from_env({})
    assert defaults.metrics.queues == ()
    assert defaults.api.list_max_bytes == 4 * 1024 * 1024
    with pytest.raises(SettingsError, match="API_LIST_MAX_BYTES"):
        Settings.from_env({"API_LIST_MAX_BYTES": "1000"})
    with pytest.raises(SettingsError, match="METRICS_QUEUES"):
        Settings.from_env({"METRICS_QUEUES": "q" * 65})


def test_auth_is_on_by_default_and_read_from_its_variables() -> None:
    from orchestrix.settings import AuthSettings

    default = AuthSettings.from_env({})
    assert default.enabled
    assert (default.open_ready, default.open_metrics) == (True, True)
    assert default.cache_ttl_s == 2.0
    read = AuthSettings.from_env(
        {
            "API_AUTH": "off",
            "API_ALLOW_UNAUTHENTICATED_REMOTE": "yes",
            "API_KEY_CACHE_TTL": "500ms",
            "API_METRICS_AUTH": "on",
            "API_KEY_REQUESTS_PER_S": "0",
            "API_KEY_JOBS_PER_S": "2.5",
        }
    )
    assert not read.enabled
    assert read.allow_remote_unauthenticated
    assert read.cache_ttl_s == 0.5
    assert (read.open_ready, read.open_metrics) == (True, False)
    assert (read.requests_per_s, read.jobs_per_s) == (0.0, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"API_AUTH": "maybe"}, "API_AUTH: must be true or false"),
        ({"API_KEY_CACHE_TTL": "10s"}, "API_KEY_CACHE_TTL: must be between 0s and 5s"),
        ({"API_KEY_REQUESTS_PER_S": "-1"}, "API_KEY_REQUESTS_PER_S: must be between 0 and"),
        ({"API_AUTH_FAILURES": "0"}, "API_AUTH_FAILURES: must be between 1 and"),
    ],
)
def test_bad_auth_values_name_the_variable(env: dict[str, str], message: str) -> None:
    from orchestrix.settings import AuthSettings

    with pytest.raises(SettingsError, match=message):
        AuthSettings.from_env(env)


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.0.0.5", True),
        ("api.internal", True),
    ],
)
def test_auth_off_listens_on_loopback_only_unless_told(host: str, refused: bool) -> None:
    from orchestrix.settings import AuthSettings

    off = AuthSettings.from_env({"API_AUTH": "off"})
    if refused:
        with pytest.raises(SettingsError, match="API_ALLOW_UNAUTHENTICATED_REMOTE=true"):
            off.check_listener(host)
    else:
        off.check_listener(host)
    AuthSettings.from_env(
        {"API_AUTH": "off", "API_ALLOW_UNAUTHENTICATED_REMOTE": "true"}
    ).check_listener(host)
    AuthSettings.from_env({}).check_listener(host)  # auth on: anywhere
