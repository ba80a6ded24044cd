"""Settings, read once from the environment into an immutable object.

Nothing here reads ``os.environ`` at import time: ``load_settings(environ)``
is called by the entry points (app factory, tasks, tests) with the mapping
they want, so tests can build settings from a plain dict.
"""

import base64
import json
import logging
import os
import secrets
from dataclasses import dataclass, field, fields, replace
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

log = logging.getLogger(__name__)

ENVIRONMENTS = ("development", "test", "production")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
URL_SCHEMES = ("postgresql", "postgres")

DEFAULT_ENV = "development"
DEFAULT_DATA_DIR = ".hoardrun"
DEFAULT_POOL_SIZE = 20
DEFAULT_MAX_OVERFLOW = 30
DEFAULT_POOL_TIMEOUT = 30.0
DEFAULT_POOL_RECYCLE = 3600
DEFAULT_POOL_PRE_PING = True
DEFAULT_ECHO = False
DEFAULT_SSL_MODE = "prefer"
DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_COMMAND_TIMEOUT = 60
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_TOKEN_TTL = 24 * 3600
DEFAULT_SECRETS_FILE = ".hoardrun-secrets.json"
DEFAULT_IDEMPOTENCY_TTL = 7 * 24 * 3600
# A client retries for hours after an outage; a key that lapsed sooner than a
# day would let a late retry move money twice.
MIN_IDEMPOTENCY_TTL = 24 * 3600
DEFAULT_METRICS = False
MIN_METRICS_TOKEN = 32
SMTP_SCHEMES = ("smtp", "smtps")
DEFAULT_SMTP_TIMEOUT = 10.0
DEFAULT_MAIL_FROM = "HoardRun <no-reply@hoardrun.localhost>"
DEFAULT_VERIFICATION_TTL = 24 * 3600
DEFAULT_RESET_TTL = 3600
DEFAULT_REPLICA_MAX_LAG = 1.0

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with; built by ``load_settings``."""

    env: str = DEFAULT_ENV
    #: Empty until ``hoardrun.embedded.with_server`` binds the embedded server
    #: (DATABASE_URL unset); ``embedded`` then says that is where it points.
    database_url: str = ""
    database_url_is_default: bool = True
    embedded: bool = False
    data_dir: str = DEFAULT_DATA_DIR
    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    #: Connections every worker of one ``invoke serve`` may open together;
    #: None: what the database server allows (see ``db.connection_allowance``).
    connection_limit: int | None = None
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    pool_recycle: int = DEFAULT_POOL_RECYCLE
    pool_pre_ping: bool = DEFAULT_POOL_PRE_PING
    echo: bool = DEFAULT_ECHO
    ssl_mode: str = DEFAULT_SSL_MODE
    ssl_root_cert: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ssl_crl: str | None = None
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
    command_timeout: int = DEFAULT_COMMAND_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    token_ttl: int = DEFAULT_TOKEN_TTL
    idempotency_ttl: int = DEFAULT_IDEMPOTENCY_TTL
    cors_origins: tuple = ()
    metrics: bool = DEFAULT_METRICS
    metrics_token: str = field(default="", repr=False)
    metrics_multiproc_dir: str | None = None
    secret_key: str = field(default="", repr=False)
    card_keys: tuple = field(default=(), repr=False)
    # None outside production: mail goes to the development outbox instead.
    smtp_url: str | None = field(default=None, repr=False)
    smtp_timeout: float = DEFAULT_SMTP_TIMEOUT
    smtp_ca_file: str | None = None
    mail_from: str = DEFAULT_MAIL_FROM
    verification_ttl: int = DEFAULT_VERIFICATION_TTL
    reset_ttl: int = DEFAULT_RESET_TTL
    #: Streaming standbys for read-only routes (``hoardrun.replicas``); repr masks them.
    replica_urls: tuple = field(default=(), repr=False)
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG

    @property
    def is_production(self):
        return self.env == "production"

    @property
    def max_connections(self):
        """peewee's pool has one bound: our size plus overflow."""
        return self.pool_size + self.max_overflow

    @property
    def masked_database_url(self):
        return mask_url(self.database_url)

    def replace(self, **changes):
        """Return a copy with ``changes`` applied (tests pin settings this way)."""
        return replace(self, **changes)

    def __repr__(self):
        # The generated repr would print the URL's password into any log or
        # traceback that shows the settings; secrets are left out entirely.
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        values["database_url"] = mask_url(self.database_url)
        values["smtp_url"] = None if self.smtp_url is None else mask_url(self.smtp_url)
        values["replica_urls"] = tuple(mask_url(u) for u in self.replica_urls)
        return "Settings({})".format(", ".join(f"{k}={v!r}" for k, v in values.items()))


def mask_url(url):
    """Return ``url`` with any user and password replaced by ``***``.

    ``postgresql://u:pw@host:5432/db`` becomes ``postgresql://***@host:5432/db``.
    Query-string secrets (``password=``, ``sslpassword=``) are masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        (k + "=***") if "pass" in k.lower() else (k + ("=" + v if sep else ""))
        for k, sep, v in (p.partition("=") for p in parts.query.split("&") if p)
    )
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # NOTE: urlunsplit drops an empty authority, turning postgresql://@/db?host=/sock
    # (a socket URL) into postgresql:///db, so rebuild by hand.
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _bad(name, value, allowed):
    shown = value if "URL" not in name else mask_url(value)
    return ConfigError(f"{name}={shown!r} is not valid: expected {allowed}")


def _int(environ, name, default, minimum=0):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _bad(name, raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise _bad(name, raw, f"an integer >= {minimum}")
    return value


def _float(environ, name, default, minimum=0.0):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise _bad(name, raw, f"a number of seconds >= {minimum:g}") from None
    if not value >= minimum or value == float("inf"):
        raise _bad(name, raw, f"a number of seconds >= {minimum:g}")
    return value


def _bool(environ, name, default):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _bad(name, raw, "one of true/false, 1/0, yes/no, on/off")


def _choice(environ, name, default, allowed):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in allowed:
        raise _bad(name, raw, "one of " + ", ".join(allowed))
    return value


def _database_url(environ, env):
    raw = (environ.get("DATABASE_URL") or "").strip()
    if not raw:
        if env == "production":
            raise ConfigError(
                "DATABASE_URL is not set: production requires a postgresql:// URL")
        return "", True
    return _postgres_url("DATABASE_URL", raw), False


def _postgres_url(name, raw):
    """``raw`` checked as a postgresql:// URL (scheme lower-cased); ConfigError names ``name``."""
    scheme = raw.split(":", 1)[0].lower() if ":" in raw else ""
    if scheme == "sqlite":
        raise ConfigError(
            f"{name}={mask_url(raw)!r} is not valid: SQLite is not supported any more; "
            "unset DATABASE_URL to use the embedded PostgreSQL server, or give a "
            "postgresql:// URL")
    if scheme not in URL_SCHEMES:
        raise _bad(name, raw, "a postgresql://user@host:port/database URL")
    # Schemes are case-insensitive (RFC 3986): PostgreSQL:// is postgresql://.
    raw = scheme + raw[len(scheme):]
    parts = urlsplit(raw)
    if not parts.hostname and not parts.path.strip("/") and "host=" not in parts.query:
        raise _bad(name, raw, "postgresql://user@host:port/database")
    try:
        parts.port
    except ValueError:
        raise _bad(name, raw, "a port between 1 and 65535") from None
    return raw


def _replica_urls(environ, primary_url):
    """DATABASE_REPLICA_URLS: comma-separated postgresql:// URLs of streaming standbys."""
    raw = (environ.get("DATABASE_REPLICA_URLS") or "").strip()
    if not raw:
        return ()
    urls = tuple(_postgres_url("DATABASE_REPLICA_URLS", part.strip())
                 for part in raw.split(",") if part.strip())
    if not primary_url:
        raise ConfigError("DATABASE_REPLICA_URLS is set but DATABASE_URL is not: replicas "
                          "need the primary they replicate named in DATABASE_URL")
    if len(set(urls)) != len(urls):
        raise ConfigError("DATABASE_REPLICA_URLS lists the same URL twice")
    if primary_url in urls:
        raise ConfigError("DATABASE_REPLICA_URLS lists DATABASE_URL itself: name only the "
                          "standbys")
    return urls


def _smtp_url(environ, env):
    raw = (environ.get("HOARDRUN_SMTP_URL") or "").strip()
    if not raw:
        if env == "production":
            raise ConfigError("HOARDRUN_SMTP_URL is not set: production requires "
                              "smtp://user:password@host:587 (STARTTLS) or smtps://…:465")
        return None
    allowed = "smtp://[user:password@]host[:port] (STARTTLS) or smtps://… (implicit TLS)"
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme not in SMTP_SCHEMES:
        raise _bad("HOARDRUN_SMTP_URL", raw, allowed)
    raw = scheme + raw[len(scheme):]
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        raise _bad("HOARDRUN_SMTP_URL", raw, "a port between 1 and 65535") from None
    if not parts.hostname or port == 0 or parts.path.strip("/") or parts.query:
        raise _bad("HOARDRUN_SMTP_URL", raw, allowed)
    return raw


def _mail_from(environ, env):
    raw = (environ.get("HOARDRUN_MAIL_FROM") or "").strip()
    if not raw:
        if env == "production":
            raise ConfigError("HOARDRUN_MAIL_FROM is not set: production requires the sender "
                              "address, e.g. 'HoardRun <no-reply@example.com>'")
        return DEFAULT_MAIL_FROM
    _, address = parseaddr(raw)
    if ("@" not in address or any(c in raw for c in "\r\n")
            or not address.split("@", 1)[1] or not address.split("@", 1)[0]):
        raise _bad("HOARDRUN_MAIL_FROM", raw,
                   "an address such as 'HoardRun <no-reply@example.com>'")
    return raw


def _origins(environ):
    raw = environ.get("HOARDRUN_CORS_ORIGINS", "")
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise _bad("HOARDRUN_CORS_ORIGINS", raw,
                       "a comma-separated list of http(s)://host[:port] origins or *")
    return origins


def _card_keys(raw, name):
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    for key in keys:
        try:
            ok = len(base64.urlsafe_b64decode(key.encode())) == 32
        except (ValueError, TypeError):
            ok = False
        if not ok:
            # Never echo a key, even a broken one.
            raise ConfigError(f"{name} is not valid: expected comma-separated "
                              "url-safe base64 Fernet keys of 32 bytes")
    return keys


#: What a production secret must not look like (``weak_secret``).
SECRET_MIN_LENGTH = 32
SECRET_MIN_DISTINCT = 8
CARD_KEY_MIN_DISTINCT_BYTES = 16
# Words of a placeholder someone forgot to replace ("change-me", "my-secret").
_PLACEHOLDER_WORDS = ("change", "secret", "password", "example", "placeholder", "default",
                      "replace", "dummy", "sample")
_SECRET_HINT = ('generate one with: python -c "import secrets; '
                'print(secrets.token_urlsafe(48))"')
_CARD_KEY_HINT = ('generate one with: python -c "from hoardrun.config import new_card_key; '
                  'print(new_card_key())"')


def _repeats_a_pattern(symbols, width):
    # A random secret has (almost) no repeated ``width``-long window;
    # "abcabcabc...", "x" * 40 or "key-key-key-" have many.
    windows = [symbols[i:i + width] for i in range(len(symbols) - width + 1)]
    return len(set(windows)) < 0.75 * len(windows)


def _is_a_sequence(symbols):
    # "abcdefgh...", "0123456789..." or a byte counter: the same step between
    # most neighbours.
    values = [ord(c) for c in symbols] if isinstance(symbols, str) else list(symbols)
    steps = [b - a for a, b in zip(values, values[1:])]
    same = sum(1 for a, b in zip(steps, steps[1:]) if a == b)
    return same > len(steps) // 2


def weak_secret(secret):
    """Why the text ``secret`` is too weak for production, or None.

    Not a strength meter: it refuses what is certainly not random (too
    short, few distinct characters, a repeated or sequential pattern, a
    placeholder word); a value from ``secrets.token_urlsafe(48)`` never trips it.
    """
    if len(secret) < SECRET_MIN_LENGTH:
        return f"it is shorter than {SECRET_MIN_LENGTH} characters"
    if len(set(secret)) < SECRET_MIN_DISTINCT:
        return f"it has fewer than {SECRET_MIN_DISTINCT} distinct characters"
    if _repeats_a_pattern(secret.lower(), 3):
        return "it repeats a pattern"
    if _is_a_sequence(secret):
        return "it is a sequence of characters"
    lowered = secret.lower()
    for word in _PLACEHOLDER_WORDS:
        if word in lowered:
            return f"it looks like a placeholder (contains {word!r})"
    return None


def weak_card_key(key):
    """Why the Fernet key ``key`` (already valid base64 of 32 bytes) is too weak, or None."""
    raw = base64.urlsafe_b64decode(key.encode())
    if len(set(raw)) < CARD_KEY_MIN_DISTINCT_BYTES:
        return ("it is all zero bytes" if not any(raw)
                else f"it has fewer than {CARD_KEY_MIN_DISTINCT_BYTES} distinct bytes")
    if _repeats_a_pattern(raw, 2):
        return "its bytes repeat a pattern"
    if _is_a_sequence(raw):
        return "its bytes are a sequence"
    if all(32 <= b < 127 for b in raw):
        # 32 random bytes are all printable once in ~10^14: this is a
        # passphrase encoded as a key, not a key.
        return "it encodes printable text, not random bytes"
    return None


def _check_production_secrets(secret_key, card_keys):
    """Refuse weak or shared secrets in production with one line (never the value).

    With a guessable secret key the card fingerprints (HMAC) plus the clear
    last four and the fixed BIN leave about 10^6 candidates per card, so a
    database backup alone would yield every card number.
    """
    reason = weak_secret(secret_key)
    if reason:
        raise ConfigError(f"HOARDRUN_SECRET_KEY is too weak for production: {reason}; "
                          + _SECRET_HINT)
    for position, key in enumerate(card_keys, start=1):
        # The same secret in both roles (as text, or as the key's bytes).
        if secret_key == key or secret_key.encode() == base64.urlsafe_b64decode(key):
            raise ConfigError(f"HOARDRUN_SECRET_KEY and HOARDRUN_CARD_ENCRYPTION_KEYS key "
                              f"{position} are the same secret: one leak must not open both; "
                              "give each its own value")
    for position, key in enumerate(card_keys, start=1):
        reason = weak_card_key(key)
        if reason:
            raise ConfigError(f"HOARDRUN_CARD_ENCRYPTION_KEYS key {position} of "
                              f"{len(card_keys)} is too weak for production: {reason}; "
                              + _CARD_KEY_HINT)
    if len(set(card_keys)) != len(card_keys):
        raise ConfigError("HOARDRUN_CARD_ENCRYPTION_KEYS lists the same key twice")


def new_card_key():
    """Return a fresh card-encryption key (url-safe base64 of 32 random bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _development_secrets(path):
    """Read, or create once, the local secrets file used outside production.

    Keeping them in a file (ignored by git) means card numbers encrypted
    yesterday still decrypt today without anyone exporting a variable.
    """
    path = Path(path)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"{path} is not a readable secrets file: "
                              "fix or delete it (encrypted card numbers need the old key)") from None
    changed = False
    if not data.get("secret_key"):
        data["secret_key"] = secrets.token_urlsafe(48)
        changed = True
    if not data.get("card_key"):
        data["card_key"] = new_card_key()
        changed = True
    if changed:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        try:
            os.chmod(path, 0o600)
        except OSError:  # NOTE: Windows ignores POSIX modes; the file stays ACL-protected.
            pass
        log.info("generated development secrets in %s", path)
    return data["secret_key"], data["card_key"]


def load_settings(environ=None):
    """Build ``Settings`` from ``environ`` (``os.environ`` when omitted).

    Raises ``ConfigError`` with one line naming the variable, the value and
    what is allowed.
    """
    environ = os.environ if environ is None else environ
    env = _choice(environ, "HOARDRUN_ENV", DEFAULT_ENV, ENVIRONMENTS)
    url, url_is_default = _database_url(environ, env)

    secret_key = (environ.get("HOARDRUN_SECRET_KEY") or "").strip()
    card_raw = (environ.get("HOARDRUN_CARD_ENCRYPTION_KEYS") or "").strip()
    if env == "production":
        if len(secret_key) < 32:
            raise ConfigError("HOARDRUN_SECRET_KEY is not valid: production requires "
                              "a secret of at least 32 characters")
        if not card_raw:
            raise ConfigError("HOARDRUN_CARD_ENCRYPTION_KEYS is not set: production "
                              "requires at least one card-encryption key")
    smtp_url = _smtp_url(environ, env)
    mail_from = _mail_from(environ, env)
    if not secret_key or not card_raw:
        file_secret, file_card = _development_secrets(
            environ.get("HOARDRUN_SECRETS_FILE") or DEFAULT_SECRETS_FILE)
        secret_key = secret_key or file_secret
        card_raw = card_raw or file_card

    metrics = _bool(environ, "HOARDRUN_METRICS", DEFAULT_METRICS)
    metrics_token = (environ.get("HOARDRUN_METRICS_TOKEN") or "").strip()
    if metrics_token and len(metrics_token) < MIN_METRICS_TOKEN:
        # Never echo a secret, even a short one.
        raise ConfigError(f"HOARDRUN_METRICS_TOKEN is not valid: expected at least "
                          f"{MIN_METRICS_TOKEN} characters")
    if metrics and env == "production" and not metrics_token:
        raise ConfigError("HOARDRUN_METRICS_TOKEN is not set: production serves /metrics only "
                          "to a scraper that sends it as a bearer token")

    multiproc_dir = (environ.get("PROMETHEUS_MULTIPROC_DIR") or "").strip() or None
    if metrics and multiproc_dir and not os.path.isdir(multiproc_dir):
        raise _bad("PROMETHEUS_MULTIPROC_DIR", multiproc_dir,
                   "an existing directory shared by the server's processes")

    settings = Settings(
        env=env,
        database_url=url,
        database_url_is_default=url_is_default,
        data_dir=(environ.get("HOARDRUN_DATA_DIR") or "").strip() or DEFAULT_DATA_DIR,
        pool_size=_int(environ, "DATABASE_POOL_SIZE", DEFAULT_POOL_SIZE, minimum=1),
        max_overflow=_int(environ, "DATABASE_MAX_OVERFLOW", DEFAULT_MAX_OVERFLOW),
        # 0 or unset: no limit of our own, only the server's
        connection_limit=_int(environ, "DATABASE_CONNECTION_LIMIT", 0) or None,
        pool_timeout=_float(environ, "DATABASE_POOL_TIMEOUT", DEFAULT_POOL_TIMEOUT),
        pool_recycle=_int(environ, "DATABASE_POOL_RECYCLE", DEFAULT_POOL_RECYCLE, minimum=1),
        pool_pre_ping=_bool(environ, "DATABASE_POOL_PRE_PING", DEFAULT_POOL_PRE_PING),
        echo=_bool(environ, "DATABASE_ECHO", DEFAULT_ECHO),
        ssl_mode=_choice(environ, "DATABASE_SSL_MODE", DEFAULT_SSL_MODE, SSL_MODES),
        ssl_root_cert=environ.get("DATABASE_SSL_ROOT_CERT") or None,
        ssl_cert=environ.get("DATABASE_SSL_CERT") or None,
        ssl_key=environ.get("DATABASE_SSL_KEY") or None,
        ssl_crl=environ.get("DATABASE_SSL_CRL") or None,
        connect_timeout=_int(environ, "DATABASE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT,
                             minimum=1),
        command_timeout=_int(environ, "DATABASE_COMMAND_TIMEOUT", DEFAULT_COMMAND_TIMEOUT),
        max_body_bytes=_int(environ, "HOARDRUN_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES,
                            minimum=1),
        token_ttl=_int(environ, "HOARDRUN_TOKEN_TTL", DEFAULT_TOKEN_TTL, minimum=60),
        idempotency_ttl=_int(environ, "HOARDRUN_IDEMPOTENCY_TTL", DEFAULT_IDEMPOTENCY_TTL,
                             minimum=MIN_IDEMPOTENCY_TTL),
        cors_origins=_origins(environ),
        metrics=metrics,
        metrics_token=metrics_token,
        metrics_multiproc_dir=multiproc_dir if metrics else None,
        secret_key=secret_key,
        card_keys=_card_keys(card_raw, "HOARDRUN_CARD_ENCRYPTION_KEYS"),
        smtp_url=smtp_url,
        smtp_timeout=_float(environ, "HOARDRUN_SMTP_TIMEOUT", DEFAULT_SMTP_TIMEOUT,
                            minimum=0.1),
        smtp_ca_file=environ.get("HOARDRUN_SMTP_CA_FILE") or None,
        mail_from=mail_from,
        verification_ttl=_int(environ, "HOARDRUN_VERIFICATION_TTL", DEFAULT_VERIFICATION_TTL,
                              minimum=60),
        reset_ttl=_int(environ, "HOARDRUN_RESET_TTL", DEFAULT_RESET_TTL, minimum=60),
        replica_urls=_replica_urls(environ, url),
        replica_max_lag=_float(environ, "DATABASE_REPLICA_MAX_LAG", DEFAULT_REPLICA_MAX_LAG),
    )
    if settings.is_production:
        _check_production_secrets(settings.secret_key, settings.card_keys)
    return settings
