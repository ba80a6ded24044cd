"""What the health endpoints report: database, migrations, process, host.

The API layer renders these answers; the database questions are asked here
(through ``hoardrun.db`` and ``hoardrun.schema``), so ``api/`` stays free of
queries. Nothing here raises for a database that is down: every check
returns what it saw, with an error string that never carries a credential.
"""

import logging
import platform
import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import peewee as pw
import psutil

from . import db as dbm
from . import replicas, schema
from .clock import utcnow

log = logging.getLogger(__name__)

SERVICE = "hoardrun"
#: The basic endpoint may reuse a database answer this old (PERFORMANCE.md 4).
DATABASE_ANSWER_MAX_AGE = 1.0
_MAX_ERROR_CHARS = 300

# What a health check treats as "the database did not answer": driver and
# pool errors alike (a server that answers with an error, e.g. a damaged
# catalog, is a DatabaseError, not an OperationalError).
CHECK_ERRORS = tuple(dbm.UNAVAILABLE_ERRORS) + (pw.DatabaseError,)




class Health:
    """Answers for the health endpoints; one instance per app, thread-safe.

    ``clock`` gives aware UTC datetimes (timestamps), ``monotonic`` seconds
    (uptime and the answer cache): tests pin both.
    """

    def __init__(self, settings, *, clock=utcnow, monotonic=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.started = monotonic()
        self._lock = threading.Lock()
        self._last_answer = None  # (monotonic time, bool)
        self._secrets = _url_secrets(settings.database_url)
        self.database_url = shown_database_url(settings)

    # -- process -----------------------------------------------------------
    def now(self):
        """The current UTC time from the injected clock."""
        return self.clock()

    def uptime(self):
        """Seconds since this app was built."""
        return round(self.monotonic() - self.started, 3)

    def system(self):
        """``{python_version, memory, disk}`` like the original service reported."""
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(Path.cwd().anchor or "/")
        return {
            "python_version": platform.python_version(),
            "memory": {"total": memory.total, "available": memory.available,
                       "percent": memory.percent},
            "disk": {"total": disk.total, "free": disk.free, "percent": disk.percent},
        }

    # -- database ----------------------------------------------------------
    def database_answers(self):
        """Whether ``SELECT 1`` succeeds now; ``(ok, error string or None)``."""
        try:
            self._ask(lambda: dbm.db.execute_sql("SELECT 1").fetchone())
        except CHECK_ERRORS as exc:
            return False, self.describe(exc)
        return True, None

    def database_answered_recently(self):
        """Like ``database_answers`` but may reuse an answer up to 1 s old.

        Probes hit the basic endpoint often; one round trip a second is
        plenty to say whether the database is there.
        """
        now = self.monotonic()
        with self._lock:
            last = self._last_answer
            if last is not None and now - last[0] <= DATABASE_ANSWER_MAX_AGE:
                return last[1]
        ok, _ = self.database_answers()
        with self._lock:
            self._last_answer = (self.monotonic(), ok)
        return ok

    def database(self):
        """The database block: masked URL, version, health, live pool numbers."""
        report = {
            "database_url": self.database_url,
            "database_version": None,
            "connection_healthy": False,
        }
        try:
            report["database_version"] = self._ask(dbm.server_version)
            report["connection_healthy"] = True
        except CHECK_ERRORS as exc:
            report["error"] = self.describe(exc)
        report["pool_info"] = dbm.pool_info()
        return report

    def replicas(self):
        """Each read replica: masked URL, healthy, lag in seconds, replay position, error.

        A fresh check, not the cached one reads use; empty without replicas.
        """
        reports = replicas.current().report()
        for report in reports:
            if report["error"]:
                for secret in self._secrets:
                    report["error"] = report["error"].replace(secret, "***")
        return reports

    def pending_migrations(self):
        """Migrations on disk not applied yet (all of them on an empty database).

        Asking the router directly would create its history table as a side
        effect; a probe must not write, so an absent table means "all pending".
        """
        return self._ask(pending_migrations)

    def readiness(self):
        """``(ready, checks, failed)``: ready only if the DB answers and nothing is pending."""
        checks = {}
        ok, error = self.database_answers()
        checks["database"] = {"status": "healthy" if ok else "unhealthy"}
        if error:
            checks["database"]["error"] = error
        if ok:
            try:
                pending = self.pending_migrations()
            except CHECK_ERRORS as exc:
                checks["migrations"] = {"status": "unknown", "error": self.describe(exc)}
            else:
                checks["migrations"] = {"status": "pending" if pending else "up_to_date",
                                        "pending": pending}
        else:
            checks["migrations"] = {"status": "unknown",
                                    "error": "not checked: the database did not answer"}
        failed = [name for name, check in checks.items()
                  if check["status"] not in ("healthy", "up_to_date")]
        return not failed, checks, failed

    @staticmethod
    def readiness_body(ready, checks, failed, now):
        """The readiness answer: the original service's shape, our detail beside it.

        ``checks`` maps each check to a plain status string, exactly as the
        original service answered (``{"database": "healthy"}``, ``"unhealthy"``
        when down); ``details`` carries the error text and pending names.
        """
        return {"status": "ready" if ready else "not_ready", "timestamp": now,
                "checks": {name: check["status"] for name, check in checks.items()},
                "details": checks, "failed": failed}

    def _ask(self, question):
        """Run ``question``; if a pooled connection turns out dead, retry once.

        A connection killed server-side (restart, pg_terminate_backend) that
        was handed back less than a second ago is reused without a ping; its
        first use fails and marks it closed. Handing it back and asking again
        takes a fresh one, so a probe does not report a restart that is over.
        """
        try:
            return question()
        except CHECK_ERRORS:
            if dbm.db.obj is None or dbm.db.is_closed():
                raise  # could not connect at all: asking again would not help
            dbm.release_connection()
            return question()

    def describe(self, exc):
        """A one-line error string for a health body, credentials removed."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _PASSWORD_IN_TEXT.sub(r"\1***", text)
        return f"{type(exc).__name__}: {text}"[:_MAX_ERROR_CHARS]


def shown_database_url(settings):
    """The database URL as reports and logs may show it: credentials masked."""
    return settings.masked_database_url


def pending_migrations():
    """Migrations not applied yet, asked without writing anything.

    ``schema.pending_migrations`` creates the router's history table when it
    is missing; a probe (or a production start-up that must not change the
    schema) treats a missing table as "every migration is pending" instead.
    """
    if not dbm.db.table_exists(schema.MIGRATE_TABLE):
        return schema.all_migrations()
    return schema.pending_migrations()


_PASSWORD_IN_TEXT = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def _url_secrets(url):
    """The password (and a user name of 3+ characters) in ``url``, longest first.

    Both raw and percent-decoded forms: a driver message shows the decoded one.
    """
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:
        return ()
    found = set()
    if password:
        found.update({password, unquote(password)})
    if username and len(username) >= 3:
        found.update({username, unquote(username)})
    return tuple(sorted(found, key=len, reverse=True))
