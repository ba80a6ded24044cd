"""Settings: the documented defaults, one clear line for a bad value, no leaked secrets."""

import base64
import json
import os
import secrets

import pytest

from hoardrun.config import SSL_MODES, ConfigError, load_settings, mask_url, new_card_key

SECRET = "UIWw60H8pcM-IhxE0Fb75frv3JmKEU5Y5zlq6qjdFE4cb-SlqW7ABniplhkf0dJh"
CARD_KEY = "0swUJ_PuTEg1h60kK4KGkBQ2u3iq1nkkZyxSEnerZp4="
PG = "postgresql://hoard:Sup3rS3cret@db.internal:5432/hoardrun"


@pytest.fixture
def env(tmp_path):
    """A development environment whose secrets file lives in tmp_path."""
    return {"HOARDRUN_SECRETS_FILE": str(tmp_path / "secrets.json")}


@pytest.fixture
def prod():
    return {"HOARDRUN_ENV": "production", "DATABASE_URL": PG,
            "HOARDRUN_SECRET_KEY": SECRET, "HOARDRUN_CARD_ENCRYPTION_KEYS": CARD_KEY,
            "HOARDRUN_SMTP_URL": "smtp://mailer:M4ilS3cret@smtp.internal:587",
            "HOARDRUN_MAIL_FROM": "HoardRun <no-reply@example.com>"}


def test_defaults_match_the_design(env):
    s = load_settings(env)
    # No URL: the embedded server under .hoardrun/ (hoardrun.embedded binds it).
    assert (s.env, s.database_url, s.database_url_is_default, s.data_dir) == (
        "development", "", True, ".hoardrun")
    assert (s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle) == (20, 30, 30, 3600)
    assert s.max_connections == 50  # peewee's pool holds at most size + overflow
    assert (s.pool_pre_ping, s.echo, s.ssl_mode) == (True, False, "prefer")
    assert (s.connect_timeout, s.command_timeout) == (10, 60)
    assert (s.ssl_root_cert, s.ssl_cert, s.ssl_key, s.ssl_crl) == (None, None, None, None)
    assert not s.embedded and not s.is_production


def test_every_database_variable_is_read(env):
    s = load_settings(dict(
        env, DATABASE_URL=PG, DATABASE_POOL_SIZE="5", DATABASE_MAX_OVERFLOW="0",
        DATABASE_POOL_TIMEOUT="2.5", DATABASE_POOL_RECYCLE="600", DATABASE_POOL_PRE_PING="off",
        DATABASE_ECHO="yes", DATABASE_SSL_MODE="verify-full",
        DATABASE_SSL_ROOT_CERT="/etc/ssl/root.crt", DATABASE_SSL_CERT="/etc/ssl/client.crt",
        DATABASE_SSL_KEY="/etc/ssl/client.key", DATABASE_SSL_CRL="/etc/ssl/root.crl",
        DATABASE_CONNECT_TIMEOUT="3", DATABASE_COMMAND_TIMEOUT="15"))
    assert s.database_url == PG and not s.database_url_is_default
    assert (s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle) == (5, 0, 2.5, 600)
    assert (s.pool_pre_ping, s.echo, s.ssl_mode) == (False, True, "verify-full")
    assert (s.ssl_root_cert, s.ssl_cert, s.ssl_key, s.ssl_crl) == (
        "/etc/ssl/root.crt", "/etc/ssl/client.crt", "/etc/ssl/client.key", "/etc/ssl/root.crl")
    assert (s.connect_timeout, s.command_timeout) == (3, 15)


@pytest.mark.parametrize("mode", SSL_MODES)
def test_all_six_libpq_ssl_modes_are_accepted(env, mode):
    assert load_settings(dict(env, DATABASE_SSL_MODE=mode)).ssl_mode == mode
    assert load_settings(dict(env, DATABASE_SSL_MODE=mode.upper())).ssl_mode == mode


def test_ssl_modes_are_the_six_of_libpq():
    assert set(SSL_MODES) == {"disable", "allow", "prefer", "require", "verify-ca",
                              "verify-full"}


@pytest.mark.parametrize("raw, value", [("true", True), ("1", True), ("YES", True), ("on", True),
                                        ("false", False), ("0", False), ("No", False),
                                        ("off", False)])
def test_boolean_spellings(env, raw, value):
    assert load_settings(dict(env, DATABASE_POOL_PRE_PING=raw)).pool_pre_ping is value


def test_blank_values_mean_the_default(env):
    s = load_settings(dict(env, DATABASE_POOL_SIZE="", DATABASE_SSL_MODE="  ",
                           DATABASE_URL=""))
    assert (s.pool_size, s.ssl_mode, s.database_url_is_default) == (20, "prefer", True)


@pytest.mark.parametrize("url, stored", [
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("PostgreSQL://u@h/db", "postgresql://u@h/db"),  # schemes are case-insensitive
    ("postgresql://u@/db?host=/run/pg", "postgresql://u@/db?host=/run/pg"),  # a socket
    ("postgresql:///db?host=/run/pg&port=5433", "postgresql:///db?host=/run/pg&port=5433"),
])
def test_accepted_database_urls(env, url, stored):
    s = load_settings(dict(env, DATABASE_URL=url))
    assert (s.database_url, s.database_url_is_default) == (stored, False)


@pytest.mark.parametrize("url", ["sqlite:///data/hoardrun.db", "SQLite:///data/hoardrun.db",
                                 "sqlite:////var/lib/hoardrun.db", "sqlite:///:memory:"])
def test_sqlite_urls_are_refused_with_what_to_do_instead(env, url):
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, DATABASE_URL=url))
    message = str(info.value)
    assert "\n" not in message
    assert message.lower().startswith(f"database_url={url.lower()!r} is not valid")
    assert "unset DATABASE_URL" in message and "postgresql://" in message


BAD = [
    # (variable, value, words the message must contain besides them)
    ("DATABASE_POOL_SIZE", "abc", ["integer"]),
    ("DATABASE_POOL_SIZE", "-1", ["integer >= 1"]),
    ("DATABASE_POOL_SIZE", "0", ["integer >= 1"]),
    ("DATABASE_POOL_SIZE", "2.5", ["integer"]),
    ("DATABASE_MAX_OVERFLOW", "-5", ["integer >= 0"]),
    ("DATABASE_POOL_TIMEOUT", "soon", ["seconds"]),
    ("DATABASE_POOL_TIMEOUT", "-1", ["seconds"]),
    ("DATABASE_POOL_TIMEOUT", "nan", ["seconds"]),
    ("DATABASE_POOL_TIMEOUT", "inf", ["seconds"]),
    ("DATABASE_POOL_RECYCLE", "0", ["integer >= 1"]),
    ("DATABASE_POOL_PRE_PING", "maybe", ["true", "false"]),
    ("DATABASE_ECHO", "loud", ["true", "false"]),
    ("DATABASE_SSL_MODE", "sometimes", ["disable", "prefer", "verify-full"]),
    ("DATABASE_CONNECT_TIMEOUT", "0", ["integer >= 1"]),
    ("DATABASE_COMMAND_TIMEOUT", "1m", ["integer"]),
    ("DATABASE_URL", "mysql://root@db/hoardrun", ["postgresql://"]),
    ("DATABASE_URL", "hoardrun.db", ["postgresql://"]),
    ("DATABASE_URL", "sqlite://hoardrun.db", ["unset DATABASE_URL", "postgresql://"]),
    ("DATABASE_URL", "postgresql://db:notaport/x", ["port"]),
    ("HOARDRUN_ENV", "staging", ["development", "test", "production"]),
    ("HOARDRUN_CORS_ORIGINS", "example.com", ["http"]),
    ("HOARDRUN_TOKEN_TTL", "10", ["integer >= 60"]),
    ("HOARDRUN_IDEMPOTENCY_TTL", "3600", ["integer >= 86400"]),
    ("HOARDRUN_IDEMPOTENCY_TTL", "7d", ["integer >= 86400"]),
    ("HOARDRUN_METRICS", "sometimes", ["true", "false"]),
    ("HOARDRUN_SMTP_URL", "mail.example.com:587", ["smtp://", "STARTTLS", "smtps://"]),
    ("HOARDRUN_SMTP_URL", "http://mail.example.com", ["smtp://", "smtps://"]),
    ("HOARDRUN_SMTP_URL", "smtp://:587", ["smtp://"]),
    ("HOARDRUN_SMTP_URL", "smtp://mail.example.com:99999", ["port"]),
    ("HOARDRUN_SMTP_URL", "smtp://mail.example.com/path", ["smtp://"]),
    ("HOARDRUN_SMTP_TIMEOUT", "0", ["seconds >= 0.1"]),
    ("HOARDRUN_MAIL_FROM", "nobody", ["address"]),
    ("HOARDRUN_VERIFICATION_TTL", "5", ["integer >= 60"]),
    ("HOARDRUN_RESET_TTL", "soon", ["integer >= 60"]),
]


@pytest.mark.parametrize("name, value, allowed", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_bad_value_is_one_line_naming_variable_value_and_what_is_allowed(env, name, value,
                                                                        allowed):
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, **{name: value}))
    message = str(info.value)
    assert "\n" not in message
    shown = mask_url(value) if name.endswith("_URL") else value  # URLs shown masked
    assert name in message and repr(shown) in message
    for word in allowed:
        assert word in message
    assert info.value.status == 500


def test_bad_url_message_masks_the_password(env):
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, DATABASE_URL="mysql://root:hunter2@db/hoardrun"))
    assert "hunter2" not in str(info.value) and "root" not in str(info.value)
    assert "DATABASE_URL='mysql://***@db/hoardrun'" in str(info.value)


def test_a_value_with_a_newline_still_gives_one_line(env):
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, DATABASE_SSL_MODE="require\nverify-full"))
    assert "\n" not in str(info.value) and "DATABASE_SSL_MODE" in str(info.value)


def test_production_settings_load(prod):
    s = load_settings(prod)
    assert s.is_production and s.database_url == PG and s.secret_key == SECRET
    assert s.card_keys == (CARD_KEY,)


@pytest.mark.parametrize("change, variable, says", [
    ({"DATABASE_URL": None}, "DATABASE_URL", "postgresql://"),
    ({"DATABASE_URL": ""}, "DATABASE_URL", "postgresql://"),
    ({"DATABASE_URL": "sqlite:///hoardrun.db"}, "DATABASE_URL", "postgresql://"),
    ({"HOARDRUN_SECRET_KEY": None}, "HOARDRUN_SECRET_KEY", "at least 32 characters"),
    ({"HOARDRUN_SECRET_KEY": "short-secret"}, "HOARDRUN_SECRET_KEY", "at least 32 characters"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": None}, "HOARDRUN_CARD_ENCRYPTION_KEYS", "card"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": "not-a-key"}, "HOARDRUN_CARD_ENCRYPTION_KEYS",
     "32 bytes"),
    ({"HOARDRUN_SMTP_URL": None}, "HOARDRUN_SMTP_URL", "smtp://"),
    ({"HOARDRUN_SMTP_URL": " "}, "HOARDRUN_SMTP_URL", "smtps://"),
    ({"HOARDRUN_MAIL_FROM": None}, "HOARDRUN_MAIL_FROM", "sender"),
])
def test_production_refuses_to_start_without_what_it_needs(prod, tmp_path, change, variable,
                                                           says):
    environ = dict(prod, HOARDRUN_SECRETS_FILE=str(tmp_path / "secrets.json"))
    for key, value in change.items():
        if value is None:
            environ.pop(key)
        else:
            environ[key] = value
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    message = str(info.value)
    assert "\n" not in message and variable in message and says in message
    for secret in ("short-secret", "not-a-key"):
        assert secret not in message  # secrets are never echoed, even broken ones
    # Production never falls back to generating secrets on disk.
    assert not (tmp_path / "secrets.json").exists()


ZERO_KEY = base64.urlsafe_b64encode(bytes(32)).decode()


@pytest.mark.parametrize("change, variable, says", [
    ({"HOARDRUN_SECRET_KEY": "a" * 32}, "HOARDRUN_SECRET_KEY", "distinct characters"),
    ({"HOARDRUN_SECRET_KEY": "a" * 64}, "HOARDRUN_SECRET_KEY", "distinct characters"),
    ({"HOARDRUN_SECRET_KEY": "changeme" * 4}, "HOARDRUN_SECRET_KEY", "too weak"),
    ({"HOARDRUN_SECRET_KEY": "prod-key-" * 5}, "HOARDRUN_SECRET_KEY", "repeats a pattern"),
    ({"HOARDRUN_SECRET_KEY": "test-secret-key-" + "x" * 40}, "HOARDRUN_SECRET_KEY",
     "repeats a pattern"),
    ({"HOARDRUN_SECRET_KEY": "abcdefghijklmnopqrstuvwxyz0123456789"}, "HOARDRUN_SECRET_KEY",
     "sequence"),
    ({"HOARDRUN_SECRET_KEY": "please-replace-with-the-real-one-2026"}, "HOARDRUN_SECRET_KEY",
     "placeholder"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": ZERO_KEY}, "HOARDRUN_CARD_ENCRYPTION_KEYS",
     "all zero bytes"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": f"{CARD_KEY},{ZERO_KEY}"},
     "HOARDRUN_CARD_ENCRYPTION_KEYS", "key 2 of 2"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": "dGVzdC1jYXJkLWtleS0wMDAwMDAwMDAwMDAwMDAwMDA="},
     "HOARDRUN_CARD_ENCRYPTION_KEYS", "too weak"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": base64.urlsafe_b64encode(bytes(range(32))).decode()},
     "HOARDRUN_CARD_ENCRYPTION_KEYS", "sequence"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS":
      base64.urlsafe_b64encode(b"Correct-Horse-Battery-Staple-42!").decode()},
     "HOARDRUN_CARD_ENCRYPTION_KEYS", "printable text"),
    ({"HOARDRUN_SECRET_KEY": CARD_KEY}, "HOARDRUN_SECRET_KEY", "same secret"),
    ({"HOARDRUN_SECRET_KEY": "k7Qw9zR2mX4pL8vN1cB6tY3hJ5gF0dSa",
      "HOARDRUN_CARD_ENCRYPTION_KEYS":
      base64.urlsafe_b64encode(b"k7Qw9zR2mX4pL8vN1cB6tY3hJ5gF0dSa").decode()},
     "HOARDRUN_SECRET_KEY", "same secret"),
    ({"HOARDRUN_CARD_ENCRYPTION_KEYS": f"{CARD_KEY},{CARD_KEY}"},
     "HOARDRUN_CARD_ENCRYPTION_KEYS", "twice"),
])
def test_production_refuses_weak_or_shared_secrets_with_one_line(prod, change, variable, says):
    environ = dict(prod, **change)
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    message = str(info.value)
    assert "\n" not in message and variable in message and says in message, message
    for value in change.values():
        for key in value.split(","):
            assert key not in message  # a secret is never echoed, even a weak one


def test_weak_secrets_are_only_refused_in_production(env):
    s = load_settings(dict(env, HOARDRUN_SECRET_KEY="a" * 32,
                           HOARDRUN_CARD_ENCRYPTION_KEYS=ZERO_KEY))
    assert s.secret_key == "a" * 32


def test_generated_secrets_always_pass_the_production_check(prod):
    """The values the error line tells an operator to generate are never refused."""
    for _ in range(300):
        s = load_settings(dict(prod, HOARDRUN_SECRET_KEY=secrets.token_urlsafe(48),
                               HOARDRUN_CARD_ENCRYPTION_KEYS=f"{new_card_key()},{new_card_key()}"))
        assert s.is_production
        assert load_settings(dict(prod, HOARDRUN_SECRET_KEY=secrets.token_hex(16))).is_production


def test_environment_name_is_case_insensitive(prod):
    assert load_settings(dict(prod, HOARDRUN_ENV="Production")).is_production


@pytest.mark.parametrize("url, masked", [
    ("postgresql://hoard:Sup3rS3cret@db:5432/hoardrun", "postgresql://***@db:5432/hoardrun"),
    ("postgresql://hoard@db/hoardrun", "postgresql://***@db/hoardrun"),
    ("postgresql://:pw@db/hoardrun", "postgresql://***@db/hoardrun"),
    ("postgresql://u:p@ss:w@rd@db/x", "postgresql://***@db/x"),
    ("postgresql://db/x?sslmode=require&password=hunter2",
     "postgresql://db/x?sslmode=require&password=***"),
    ("postgresql://u:pw@db/x?sslpassword=k&application_name=hr",
     "postgresql://***@db/x?sslpassword=***&application_name=hr"),
    ("postgresql:///x?host=/var/run/postgresql&PASSWORD=pw",
     "postgresql:///x?host=/var/run/postgresql&PASSWORD=***"),
    ("postgresql://db:5432/hoardrun", "postgresql://db:5432/hoardrun"),
    ("postgresql://u:pw@/hoardrun?host=/run/pg", "postgresql://***@/hoardrun?host=/run/pg"),
    ("postgresql:///hoardrun?host=/run/pg", "postgresql:///hoardrun?host=/run/pg"),
    ("postgresql://[::1/broken", "***"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("url, password", [
    (PG, "Sup3rS3cret"),
    ("postgresql://hoard@db/x?password=Qu3ryS3cret", "Qu3ryS3cret"),
])
def test_password_never_appears_when_settings_are_shown(env, url, password):
    s = load_settings(dict(env, DATABASE_URL=url))
    assert s.database_url == url  # the real URL is still there for connecting
    for shown in (str(s), repr(s), s.masked_database_url, repr(s.replace(pool_size=3))):
        assert password not in shown
        assert "hoard" not in shown.replace("hoardrun", "")
    assert "***" in repr(s)


def test_secrets_are_never_shown(prod):
    s = load_settings(prod)
    assert SECRET not in repr(s) and CARD_KEY not in repr(s)


def test_development_secrets_are_created_once_and_reused(tmp_path):
    path = tmp_path / "secrets.json"
    env = {"HOARDRUN_SECRETS_FILE": str(path)}
    assert not path.exists()

    first = load_settings(env)
    assert path.exists()
    assert len(first.secret_key) >= 32 and len(first.card_keys) == 1
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600  # readable by the owner only
    stored = json.loads(path.read_text())
    assert stored == {"secret_key": first.secret_key, "card_key": first.card_keys[0]}

    second = load_settings(env)
    assert (second.secret_key, second.card_keys) == (first.secret_key, first.card_keys)
    assert json.loads(path.read_text()) == stored  # not rewritten

    elsewhere = load_settings({"HOARDRUN_SECRETS_FILE": str(tmp_path / "other.json")})
    assert elsewhere.secret_key != first.secret_key  # generated, not a constant


def test_explicit_secrets_win_over_the_file(tmp_path):
    path = tmp_path / "secrets.json"
    s = load_settings({"HOARDRUN_SECRETS_FILE": str(path), "HOARDRUN_SECRET_KEY": SECRET,
                       "HOARDRUN_CARD_ENCRYPTION_KEYS": CARD_KEY})
    assert (s.secret_key, s.card_keys) == (SECRET, (CARD_KEY,))
    assert not path.exists()


def test_a_corrupt_secrets_file_is_one_clear_line(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_settings({"HOARDRUN_SECRETS_FILE": str(path)})
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_text() == "{not json"  # never overwritten: old card numbers need it


def test_settings_are_immutable(env):
    s = load_settings(env)
    with pytest.raises(AttributeError):
        s.pool_size = 1
    assert s.replace(pool_size=1).pool_size == 1 and s.pool_size == 20


def test_nothing_is_read_from_the_process_environment_when_a_mapping_is_given(env,
                                                                              monkeypatch):
    monkeypatch.setenv("DATABASE_POOL_SIZE", "abc")
    assert load_settings(env).pool_size == 20


def test_idempotency_and_metrics_defaults_and_values(env, tmp_path):
    s = load_settings(env)
    assert (s.idempotency_ttl, s.metrics, s.metrics_token, s.metrics_multiproc_dir) == (
        7 * 24 * 3600, False, "", None)
    s = load_settings(dict(env, HOARDRUN_IDEMPOTENCY_TTL="86400", HOARDRUN_METRICS="on",
                           HOARDRUN_METRICS_TOKEN="m" * 32,
                           PROMETHEUS_MULTIPROC_DIR=str(tmp_path)))
    assert (s.idempotency_ttl, s.metrics, s.metrics_multiproc_dir) == (86400, True,
                                                                        str(tmp_path))
    assert "m" * 32 not in repr(s)


def test_a_short_metrics_token_is_refused_without_echoing_it(env):
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, HOARDRUN_METRICS="true", HOARDRUN_METRICS_TOKEN="tiny-token"))
    assert "HOARDRUN_METRICS_TOKEN" in str(info.value) and "tiny-token" not in str(info.value)


def test_production_metrics_need_a_token(prod):
    with pytest.raises(ConfigError, match="HOARDRUN_METRICS_TOKEN is not set"):
        load_settings(dict(prod, HOARDRUN_METRICS="true"))
    assert load_settings(dict(prod, HOARDRUN_METRICS="true",
                              HOARDRUN_METRICS_TOKEN="p" * 40)).metrics


def test_a_missing_multiprocess_directory_is_one_line(env, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        load_settings(dict(env, HOARDRUN_METRICS="true", PROMETHEUS_MULTIPROC_DIR=missing))
    assert f"PROMETHEUS_MULTIPROC_DIR={missing!r} is not valid" in str(info.value)


def test_replica_urls_and_max_lag(env):
    s = load_settings({**env, "DATABASE_URL": PG})
    assert (s.replica_urls, s.replica_max_lag) == ((), 1.0)
    replica = "postgresql://hoard:Sup3rS3cret@replica-1.internal:5432/hoardrun"
    s = load_settings({**env, "DATABASE_URL": PG, "DATABASE_REPLICA_MAX_LAG": "2.5",
                       "DATABASE_REPLICA_URLS": f" {replica} , POSTGRES://replica-2/hoardrun,"})
    assert s.replica_urls == (replica, "postgres://replica-2/hoardrun")
    assert s.replica_max_lag == 2.5
    assert "Sup3rS3cret" not in repr(s)


@pytest.mark.parametrize("extra, says", [
    ({"DATABASE_REPLICA_URLS": "mysql://replica/db"},
     "DATABASE_REPLICA_URLS='mysql://replica/db' is not valid: expected a postgresql://"),
    ({"DATABASE_REPLICA_URLS": "postgresql://r/db,postgresql://r/db"}, "the same URL twice"),
    ({"DATABASE_REPLICA_URLS": PG}, "lists DATABASE_URL itself"),
    ({"DATABASE_REPLICA_MAX_LAG": "soon"},
     "DATABASE_REPLICA_MAX_LAG='soon' is not valid: expected a number of seconds >= 0"),
    ({"DATABASE_REPLICA_MAX_LAG": "-1"}, "DATABASE_REPLICA_MAX_LAG='-1' is not valid"),
])
def test_bad_replica_settings_are_one_line(env, extra, says):
    with pytest.raises(ConfigError) as error:
        load_settings({**env, "DATABASE_URL": PG, **extra})
    assert says in str(error.value) and "\n" not in str(error.value)
    assert "Sup3rS3cret" not in str(error.value)


def test_replicas_need_a_primary_url(env):
    with pytest.raises(ConfigError, match="DATABASE_REPLICA_URLS is set but DATABASE_URL is not"):
        load_settings({**env, "DATABASE_REPLICA_URLS": "postgresql://replica/db"})
