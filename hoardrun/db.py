"""The one database object, its pool, timeouts and health information.

``db`` is a proxy bound by ``init_db(settings)`` to a pooled PostgreSQL
database (the operator's, or the embedded server: ``hoardrun.embedded``). Connections are opened lazily
by peewee on first use and handed back by the request middleware, so a
request that never touches the database never checks one out.
"""

import contextlib
import logging
import select
import threading
import time
import uuid
from datetime import datetime, timezone
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee as pw
import psycopg2.extensions
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pool import _PooledPostgresqlDatabase

from .config import DEFAULT_COMMAND_TIMEOUT, SSL_MODES
from .errors import ConfigError

log = logging.getLogger(__name__)

_UUID_OID, _UUID_ARRAY_OID = 2950, 2951


def _uuid_from_text(text, cursor):
    """A ``uuid`` column's text as a ``uuid.UUID`` (psycopg2 type caster; NULL is None).

    Replaces the caster peewee registers (``psycopg2.extras.register_uuid``),
    which calls ``uuid.UUID(text)``: its argument checks and hex clean-up
    took a third of a history page's CPU (about 170 ids a page). The server
    only ever sends the canonical 36-character form, so the 128-bit value
    is set directly, the way ``uuid.UUID`` itself sets it (and unpickles).
    """
    if text is None:
        return None
    value = object.__new__(uuid.UUID)
    object.__setattr__(value, "int", int(text.replace("-", ""), 16))
    object.__setattr__(value, "is_safe", uuid.SafeUUID.unknown)
    return value


_UUID_TYPE = psycopg2.extensions.new_type((_UUID_OID,), "HOARDRUN_UUID", _uuid_from_text)
psycopg2.extensions.register_type(_UUID_TYPE)
psycopg2.extensions.register_type(
    psycopg2.extensions.new_array_type((_UUID_ARRAY_OID,), "HOARDRUN_UUID[]", _UUID_TYPE))



class _RoutingProxy(pw.DatabaseProxy):
    """``db``: the primary, except in a thread inside ``reading_from(replica)``.

    Everything that goes through the proxy (model queries, ``db.execute_sql``,
    ``db.atomic``) uses the database this thread is routed to; ``db.obj`` is
    always the primary (pool numbers, the connection the middleware hands
    back, deferred writes).
    """

    __slots__ = ("_reads",)
    _ATTRIBUTES = frozenset(pw.DatabaseProxy.__slots__) | {"_reads"}

    def __init__(self):
        self._reads = threading.local()
        super().__init__()

    def __setattr__(self, attr, value):
        # peewee's Proxy checks the subclass's own __slots__ only.
        if attr not in self._ATTRIBUTES:
            raise AttributeError("Cannot set attribute on proxy.")
        object.__setattr__(self, attr, value)

    def __getattr__(self, attr):
        routed = getattr(self._reads, "database", None)
        if routed is not None:
            return getattr(routed, attr)
        return super().__getattr__(attr)


db = _RoutingProxy()

# A connection that came back to the pool less than this long ago is handed
# out without a liveness round trip (PERFORMANCE.md: pinging every checkout
# costs a round trip per request for no gain).
PRE_PING_IDLE_SECONDS = 1.0

#: Errors that mean "the database is not there right now" (503, not 500).
UNAVAILABLE_ERRORS = (pw.OperationalError, pw.InterfaceError, MaxConnectionsExceeded)


def transaction_settings(command_timeout):
    """The ``SET LOCAL`` statements every transaction starts with.

    UTC, so whatever the server renders in time is UTC; the statement
    timeout (``DATABASE_COMMAND_TIMEOUT`` seconds, 0 = none) is enforced by
    the server, so a runaway query is cancelled even if this process is
    stuck. Per transaction rather than per session (a connection option):
    behind a transaction-mode pooler a session is not ours to configure.
    """
    return (f"SET LOCAL statement_timeout = {int(command_timeout) * 1000}; "
            "SET LOCAL timezone = 'UTC'")


class UTCDateTimeField(pw.Field):
    """A timezone-aware UTC timestamp (TIMESTAMPTZ); naive datetimes are refused."""

    field_type = "TIMESTAMPTZ"

    def db_value(self, value):
        if value is None or not isinstance(value, datetime):
            return value
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def python_value(self, value):
        return to_utc(value)


def to_utc(value):
    """Return ``value`` (a datetime from the driver) as an aware UTC datetime."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class _PrePingMixin:
    """Pool behaviour on top of peewee's pool.

    * ``pool_size`` connections are kept idle; up to ``max_overflow`` more may
      be opened under load and are closed when handed back.
    * A connection idle for over ``PRE_PING_IDLE_SECONDS`` is pinged before
      reuse, so a restarted server costs no failed request.
    * A younger one is pinged only if the server has sent it something while
      it sat idle (a session the server ended, e.g. pg_terminate_backend or a
      shutdown, has its goodbye and EOF waiting): a zero-wait ``select``,
      no round trip, so a session killed just after a request is not handed
      to the next one.
    """

    def __init__(self, *args, pool_size=20, pre_ping=True, **kwargs):
        self.pool_size = pool_size
        self.pre_ping = pre_ping
        self._returned_at = {}
        super().__init__(*args, **kwargs)

    def _is_closed(self, conn):
        key = self.conn_key(conn)
        returned = self._returned_at.pop(key, None)
        if self._raw_is_closed(conn):
            return True
        if not self.pre_ping or returned is None:
            return False
        if (time.monotonic() - returned < PRE_PING_IDLE_SECONDS
                and not self._input_pending(conn)):
            return False
        return not self._ping(conn)

    def _close(self, conn, close_conn=False):
        key = self.conn_key(conn)
        with self._pool_lock:
            if not close_conn and key in self._in_use and len(self._connections) >= self.pool_size:
                # Overflow connection: close it rather than keep it idle.
                close_conn = True
            super()._close(conn, close_conn=close_conn)
            if not close_conn:
                self._returned_at[key] = time.monotonic()
            else:
                self._returned_at.pop(key, None)

    def pool_info(self):
        """Live pool numbers, read from the pool itself."""
        with self._pool_lock:
            checked_in = len(self._connections)
            checked_out = len(self._in_use)
        return {
            "pool_size": self.pool_size,
            "checked_in": checked_in,
            "checked_out": checked_out,
            "overflow": max(0, checked_in + checked_out - self.pool_size),
            "max_connections": self._max_connections,
        }


class PostgresDatabase(_PrePingMixin, _PooledPostgresqlDatabase, pw.PostgresqlDatabase):
    """Pooled PostgreSQL with pre-ping, overflow and piggybacked transaction control.

    No session state: every transaction carries its own settings (``SET
    LOCAL`` of the UTC time zone and the statement timeout, sent with its
    BEGIN, or in front of a statement run on its own), and nothing is
    prepared, locked, created or listened to across transactions. So a
    transaction-mode pooler (PgBouncer ``pool_mode = transaction``) may hand
    each transaction to a different server session.

    Round trips, not SQL, are the cost on the money path (PERFORMANCE.md), so
    statements that return nothing anybody reads are not sent on their own:
    BEGIN, SAVEPOINT, RELEASE / ROLLBACK TO SAVEPOINT and ``defer()``-ed
    writes are queued per thread and sent in the same round trip as the
    transaction's next statement (psycopg2 runs ``A; B; C`` in order and
    stops at the first error), and a COMMIT carries whatever is still
    queued. Semantics are unchanged: the server sees the same statements in
    the same order inside the same transaction; only the packets differ.
    """

    _SAVEPOINT_PREFIXES = ("SAVEPOINT ", "RELEASE SAVEPOINT ", "ROLLBACK TO SAVEPOINT ")

    def __init__(self, *args, command_timeout=DEFAULT_COMMAND_TIMEOUT, **kwargs):
        self._queued = threading.local()
        self.transaction_settings = transaction_settings(command_timeout)
        super().__init__(*args, **kwargs)

    def _queue(self):
        """This thread's queued statements: (is_write, sql text) pairs."""
        queue = getattr(self._queued, "statements", None)
        if queue is None:
            queue = self._queued.statements = []
        return queue

    @staticmethod
    def _joined(queue):
        return "; ".join(text for _, text in queue)

    def begin(self, isolation_level=None):
        """Start a transaction lazily: BEGIN travels with its first statement."""
        if self.is_closed():
            self.connect()
        level = isolation_level or self._isolation_level
        begin = (f"BEGIN TRANSACTION ISOLATION LEVEL {self._adapter.isolation_level_str(level)}"
                 if level else "BEGIN")
        self._queue().append((False, f"{begin}; {self.transaction_settings}"))

    def defer(self, sql, params=()):
        """Send a write whose result nobody reads with the transaction's next statement.

        Outside a transaction it runs at once. Its errors surface at that next
        statement (or the COMMIT), still inside the same transaction.
        """
        if not self.in_transaction():
            return self.execute_sql(sql, params)
        with pw.__exception_wrapper__:
            text = self.cursor().mogrify(sql, params or None).decode("utf-8")
        self._queue().append((True, text))
        return None

    def execute_sql(self, sql, params=None, *args, **kwargs):
        queue = self._queue()
        if sql.startswith(self._SAVEPOINT_PREFIXES):
            queue.append((False, sql.rstrip("; ")))
            return None  # peewee's savepoints never read their cursor
        if queue:
            # '%%': the queued text is already interpolated, and psycopg2 will
            # read the whole string as a template because params are passed.
            sql = self._joined(queue).replace("%", "%%") + "; " + sql
            queue.clear()
        elif not self.in_transaction():
            # On its own the statement is its own (implicit) transaction, and
            # so are the settings sent in front of it in the same string.
            sql = f"{self.transaction_settings}; {sql}"
        return super().execute_sql(sql, params, *args, **kwargs)

    def execute_alone(self, sql):
        """Run ``sql`` exactly as given, outside any transaction block.

        For the few commands PostgreSQL refuses inside one (CREATE DATABASE,
        VACUUM, … ``CONCURRENTLY``), which the settings ``execute_sql``
        puts in front of a statement would make a block of two.
        """
        if self.in_transaction():
            raise RuntimeError("execute_alone() inside a transaction")
        return super().execute_sql(sql)

    def commit(self):
        queue = self._queue()
        if queue and queue[0][1].startswith("BEGIN") and not any(w for w, _ in queue):
            # Nothing of this transaction reached the server: nothing to commit.
            queue.clear()
            return None
        if queue:
            sql = self._joined(queue) + "; COMMIT"
            queue.clear()
            with pw.__exception_wrapper__:
                self.cursor().execute(sql)
            return None
        return super().commit()

    def rollback(self):
        queue = self._queue()
        unsent = bool(queue) and queue[0][1].startswith("BEGIN")
        queue.clear()  # queued writes die with the transaction
        if unsent:
            return None
        return super().rollback()

    def close(self):
        self._queue().clear()
        return super().close()

    def _raw_is_closed(self, conn):
        from psycopg2 import extensions
        return bool(conn.closed) or (
            conn.get_transaction_status() == extensions.TRANSACTION_STATUS_UNKNOWN)

    def _input_pending(self, conn):
        # An idle session has nothing to read unless the server spoke: a
        # FATAL before closing, or (harmless) a notice; the ping tells which.
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except Exception:  # no usable socket (driver or OS error): let the ping decide
            return True
        return bool(readable)

    def _ping(self, conn):
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
            return True
        except Exception:  # any driver error means the connection is unusable
            log.info("discarding a pooled connection that failed its liveness check")
            return False

    def server_version_string(self):
        return self.execute_sql("SELECT version()").fetchone()[0]


def _postgres_params(settings):
    """``(database name, libpq keyword parameters)`` for ``settings``.

    Precedence, lowest first: the URL's authority and path, then its query
    string (libpq parameters such as ``?host=/run/sock&port=5433``: the
    README documents them, so they must win over the empty host of
    ``postgresql://user@/db``), then what HoardRun's own settings say.
    """
    parts = urlsplit(settings.database_url)
    params = {
        "host": parts.hostname or None,
        "port": parts.port or None,
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "dbname": unquote(parts.path.lstrip("/")) or None,
    }
    params = {k: v for k, v in params.items() if v is not None}
    params.update(parse_qsl(parts.query))
    params.update({
        "sslmode": _stricter_ssl_mode(params.get("sslmode"), settings.ssl_mode),
        "connect_timeout": settings.connect_timeout,
        "application_name": "hoardrun",
        # NOTE: no "options" (-c timezone=... -c statement_timeout=...): a
        # pooler refuses or drops that startup parameter, and what it set
        # would be session state. PostgresDatabase sends both per transaction.
    })
    for key, value in (("sslrootcert", settings.ssl_root_cert), ("sslcert", settings.ssl_cert),
                       ("sslkey", settings.ssl_key), ("sslcrl", settings.ssl_crl)):
        if value:
            params[key] = value
    return params.pop("dbname", None) or "postgres", params


def _stricter_ssl_mode(from_url, from_settings):
    """The stricter of the URL's ``sslmode`` and DATABASE_SSL_MODE: never silently weaker."""
    if from_url not in SSL_MODES:
        return from_settings
    return max(from_url, from_settings, key=SSL_MODES.index)


def build_database(settings):
    """Create (but do not connect) the pooled database ``settings`` describe."""
    if not settings.database_url:
        raise ValueError("settings carry no database URL: pass them through "
                         "hoardrun.embedded.with_server first")
    name, params = _postgres_params(settings)
    return PostgresDatabase(
        name,
        pool_size=settings.pool_size,
        pre_ping=settings.pool_pre_ping,
        max_connections=settings.max_connections,
        stale_timeout=settings.pool_recycle,
        timeout=settings.pool_timeout or None,
        autorollback=False,
        command_timeout=settings.command_timeout,
        **params,
    )


def init_db(settings):
    """Build the database for ``settings``, bind ``db`` to it and return it."""
    database = build_database(settings)
    logging.getLogger("peewee").setLevel(logging.DEBUG if settings.echo else logging.WARNING)
    db.initialize(database)
    return database


def driver_error(exc):
    """The psycopg2 exception behind a peewee error (it carries pgcode, diag)."""
    for candidate in (getattr(exc, "orig", None), *(exc.args[:1]), exc.__cause__,
                      exc.__context__):
        if candidate is not None and not isinstance(candidate, str):
            return candidate
    return exc


@contextlib.contextmanager
def reading_from(database):
    """Route this thread's queries through ``db`` to ``database`` (a replica) inside.

    On the way out its connection goes back to that database's pool. Nested
    use and writes are the caller's mistake (a standby refuses writes).
    """
    reads = db._reads
    if getattr(reads, "database", None) is not None:
        raise RuntimeError("reading_from() is already active in this thread")
    reads.database = database
    try:
        yield database
    finally:
        reads.database = None
        if not database.is_closed():
            database.close()


def execute_deferred(sql, params=()):
    """Run a write whose result nobody reads (an audit row, a stored response).

    Inside a transaction it rides with the next statement or the COMMIT
    (see ``PostgresDatabase``); outside one it runs now.
    """
    return db.obj.defer(sql, params)


def close_db():
    """Close every pooled connection (used at shutdown and between tests)."""
    database = db.obj
    if database is not None:
        database.close_all()


def release_connection():
    """Hand this thread's connection back to the pool, if it holds one."""
    database = db.obj
    if database is not None and not database.is_closed():
        database.close()


def server_version():
    """The server's version string, e.g. ``PostgreSQL 15.19 …``."""
    return db.obj.server_version_string()


def pool_info():
    """``{pool_size, checked_in, checked_out, overflow}`` read from the live pool."""
    info = db.obj.pool_info()
    return {k: info[k] for k in ("pool_size", "checked_in", "checked_out", "overflow")}


def ssl_in_use():
    """Whether this session's connection to the server is encrypted."""
    row = db.execute_sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    return bool(row and row[0])


# --------------------------------------------------------------------------- sizing

@dataclass(frozen=True)
class ConnectionAllowance:
    """How many connections this role may open on this database, and why."""

    allowed: int
    max_connections: int
    reserved: int
    reason: str


def connection_allowance(settings):
    """What the server (and ``DATABASE_CONNECTION_LIMIT``) lets all our workers open together.

    ``max_connections`` less the slots kept for superusers and
    ``pg_use_reserved_connections`` (PostgreSQL 16+), lower still when the
    role or the database has a ``CONNECTION LIMIT``. Other clients of the same
    server (tasks, monitoring, other hosts) are not subtracted: with several
    hosts, set ``DATABASE_CONNECTION_LIMIT`` to each host's share.
    """
    row = db.execute_sql(
        "SELECT current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int, "
        "coalesce(current_setting('reserved_connections', true), '0')::int, "
        "(SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user), "
        "(SELECT datconnlimit FROM pg_database WHERE datname = current_database())").fetchone()
    max_conn, superuser, reserved, role_limit, db_limit = row
    allowed = max_conn - superuser - reserved
    reason = f"max_connections {max_conn} - {superuser + reserved} reserved"
    for limit, what in ((role_limit, "the role's CONNECTION LIMIT"),
                        (db_limit, "the database's CONNECTION LIMIT"),
                        (settings.connection_limit, "DATABASE_CONNECTION_LIMIT")):
        if limit is not None and limit >= 0 and limit < allowed:
            allowed, reason = limit, f"{what} {limit}"
    return ConnectionAllowance(max(0, allowed), max_conn, superuser + reserved, reason)


@dataclass(frozen=True)
class PoolPlan:
    """Each worker's pool: ``workers`` x (``pool_size`` + ``max_overflow``) <= ``allowed``."""

    workers: int
    threads: int
    pool_size: int
    max_overflow: int
    allowed: int
    reason: str

    @property
    def total(self):
        return self.workers * (self.pool_size + self.max_overflow)

    def describe(self):
        """One line for the start-up log and ``db.check --verbose``."""
        return (f"{self.workers} worker(s) x {self.threads} threads, pool {self.pool_size} + "
                f"overflow {self.max_overflow} each: at most {self.total} connections of the "
                f"{self.allowed} the database allows ({self.reason})")


def plan_pools(settings, allowance, *, workers, threads):
    """Size every worker's pool from its threads within the database's allowance.

    A thread holds at most one connection at a time, so each worker needs
    ``threads``; the pool keeps at least that many (more when
    DATABASE_POOL_SIZE says so and the allowance has room), and the overflow
    is what remains of the worker's share. Raises ``ConfigError`` when even
    ``workers`` x ``threads`` do not fit.
    """
    share = allowance.allowed // workers
    if share < threads:
        raise ConfigError(
            f"{workers} worker(s) x {threads} threads need {workers * threads} database "
            f"connections but the database allows {allowance.allowed} ({allowance.reason}): "
            "use fewer workers or threads, or raise the server's max_connections")
    pool = min(max(settings.pool_size, threads), share)
    overflow = min(settings.max_overflow, share - pool)
    return PoolPlan(workers, threads, pool, overflow, allowance.allowed, allowance.reason)
