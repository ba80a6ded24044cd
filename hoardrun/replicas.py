"""Read replicas: which streaming standby may answer a read, and for whom.

``DATABASE_REPLICA_URLS`` names standbys of the primary (``DATABASE_URL``).
Read-only routes ask ``choose(user_id)`` for one and run their reads inside
``hoardrun.db.reading_from(replica.database)``; ``None`` means the primary.

* **Fresh enough.** A replica is used only while its replay lag is at most
  ``DATABASE_REPLICA_MAX_LAG`` seconds: zero when it has replayed the
  primary's WAL position read just before (``pg_last_wal_replay_lsn() >=
  pg_current_wal_lsn()``), else the age of the last transaction it replayed
  (``now() - pg_last_xact_replay_timestamp()``), so a paused or stuck
  replay ages out and an idle, caught-up standby does not.
* **Cheap.** The check is cached: at most one request a second (the one
  that finds the answer older than ``CHECK_INTERVAL``) asks the primary and
  each replica one short query; no other request pays a round trip, and
  while one thread checks, the others use the previous answer.
* **No failed request.** An unreachable replica is marked down at the check
  (and by the read that found it down, which the primary then answers); a
  lagging one is skipped; with none usable the primary answers.
* **Read-your-writes.** ``wrote(user_id)`` after a user's request that may
  have written (any non-GET): until the next check reads the primary's WAL
  position P, that user reads from the primary; after it, only from a
  replica that has replayed P. P is read after the write committed, so the
  replica has the user's write. No round trip on the write path.
  NOTE: this memory is per process. With several server processes, a user
  whose next read reaches another process may read from a replica that
  misses their last second of writes (bounded by the max lag); pin users to
  a process (sticky sessions) or keep the max lag small if that matters.

The replica set of the running app is module state (``configure``), like
the ``db`` proxy, so resources and the health report reach the same one.
"""

import contextlib
import logging
import random
import threading
import time

import peewee as pw

from . import db as dbm
from .config import DEFAULT_REPLICA_MAX_LAG, mask_url

log = logging.getLogger(__name__)

#: Seconds a lag check is reused (PERFORMANCE.md: no round trip per request).
CHECK_INTERVAL = 1.0
#: Seconds a replica's connection attempt may take (a dead host must not
#: hold the request that checks it for DATABASE_CONNECT_TIMEOUT).
REPLICA_CONNECT_TIMEOUT = 2
#: A user's read-your-writes mark is dropped after this many seconds: by then
#: a replica within the max lag has their write anyway (margin for clocks).
MARK_TTL = 60.0

CHECK_ERRORS = tuple(dbm.UNAVAILABLE_ERRORS) + (pw.DatabaseError,)

_LAG_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn,"
    " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())")


class Replica:
    """One standby: its pool and what the last check saw."""

    def __init__(self, url, database):
        self.url = mask_url(url)
        self.database = database
        self.replay_lsn = None      # bytes into the WAL, as an int
        self.lag = None             # seconds, None when unknown
        self.error = None           # why it is not usable, None when it is
        self.checked = False

    def usable(self, max_lag):
        """Whether the last check saw it up and within ``max_lag`` seconds."""
        return self.error is None and self.lag is not None and self.lag <= max_lag

    def report(self, max_lag):
        """What the health endpoint and ``db.check --verbose`` show."""
        return {"url": self.url, "healthy": self.usable(max_lag),
                "lag_seconds": None if self.lag is None else round(self.lag, 3),
                "replay_lsn": None if self.replay_lsn is None else _lsn_text(self.replay_lsn),
                "error": self.error}


class ReplicaSet:
    """The configured replicas and each recent writer's read-your-writes mark."""

    def __init__(self, settings=None, *, monotonic=time.monotonic):
        self.max_lag = settings.replica_max_lag if settings else DEFAULT_REPLICA_MAX_LAG
        self.monotonic = monotonic
        self.replicas = []
        if settings:
            connect_timeout = min(settings.connect_timeout, REPLICA_CONNECT_TIMEOUT)
            self.replicas = [
                Replica(url, dbm.build_database(settings.replace(
                    database_url=url, connect_timeout=connect_timeout)))
                for url in settings.replica_urls]
        self.primary_lsn = None
        self._checked_at = None
        self._check_lock = threading.Lock()
        self._marks_lock = threading.Lock()
        self._pending = {}          # user id -> monotonic time of their last write
        self._required = {}         # user id -> (WAL position a replica must have, since)

    def __bool__(self):
        return bool(self.replicas)

    # -- the hot path --------------------------------------------------------
    def choose(self, user_id):
        """A replica that may answer ``user_id``'s read now, or None (the primary)."""
        if not self.replicas:
            return None
        now = self.monotonic()
        if self._checked_at is None or now - self._checked_at >= CHECK_INTERVAL:
            self.check(wait=False)
        if user_id in self._pending:
            return None
        required = self._required.get(user_id)
        usable = [r for r in self.replicas if r.usable(self.max_lag)
                  and (required is None or r.replay_lsn >= required[0])]
        return random.choice(usable) if usable else None

    def wrote(self, user_id):
        """``user_id`` may have written just now: read-your-writes until a replica has it."""
        if self.replicas:
            with self._marks_lock:
                self._pending[user_id] = self.monotonic()

    def failed(self, replica, error):
        """A read found ``replica`` unusable: skip it until a check sees it well."""
        replica.error = describe(error)
        log.warning("replica %s failed a read; the primary answers: %s", replica.url,
                    replica.error)

    # -- the check -----------------------------------------------------------
    def check(self, *, wait=True):
        """Ask the primary's WAL position and each replica's replay; update the marks.

        ``wait=False`` (requests): if another thread is checking, return at once.
        """
        if not self._check_lock.acquire(blocking=wait):
            return
        try:
            started = self.monotonic()
            try:
                primary = dbm.db.obj.execute_sql(
                    "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]
                self.primary_lsn = int(primary)
            except CHECK_ERRORS as error:
                # Without the primary's position nobody's write can be placed:
                # replicas wait for the next check.
                log.warning("replica check could not read the primary's WAL position: %s",
                            describe(error))
                self.primary_lsn = None
            for replica in self.replicas:
                self._check_one(replica)
            self._update_marks(started)
            self._checked_at = self.monotonic()
        finally:
            self._check_lock.release()

    def _check_one(self, replica):
        database = replica.database
        replica.checked = True
        try:
            in_recovery, replay, age = database.execute_sql(_LAG_SQL).fetchone()
        except CHECK_ERRORS as error:
            replica.error, replica.lag = describe(error), None
            # A broken connection must not go back to the pool.
            with contextlib.suppress(Exception):
                database.close_all()
            return
        finally:
            if not database.is_closed():
                database.close()
        if not in_recovery:
            replica.error, replica.lag = "not a standby (pg_is_in_recovery() is false)", None
            return
        if replay is None:
            replica.error, replica.lag = "has replayed no WAL yet", None
            return
        replica.replay_lsn = int(replay)
        replica.error = None
        if self.primary_lsn is None:
            replica.lag = None
        elif replica.replay_lsn >= self.primary_lsn:
            replica.lag = 0.0
        else:
            replica.lag = float("inf") if age is None else max(0.0, float(age))

    def _update_marks(self, started):
        now = self.monotonic()
        with self._marks_lock:
            if self.primary_lsn is not None:
                for user_id, marked in list(self._pending.items()):
                    if marked <= started:  # wrote before the primary was asked
                        del self._pending[user_id]
                        self._required[user_id] = (self.primary_lsn, now)
            # A mark every replica has replayed, or an old one, holds nobody back.
            known = [r.replay_lsn for r in self.replicas]
            floor = min(known) if known and None not in known else None
            for user_id, (lsn, since) in list(self._required.items()):
                if (floor is not None and lsn <= floor) or now - since > MARK_TTL:
                    del self._required[user_id]
            for user_id, marked in list(self._pending.items()):
                if now - marked > MARK_TTL:
                    del self._pending[user_id]

    # -- reports -------------------------------------------------------------
    def report(self):
        """Each replica's state after a fresh check (health, ``db.check``)."""
        if not self.replicas:
            return []
        self.check()
        return [replica.report(self.max_lag) for replica in self.replicas]

    def close(self):
        """Close every replica pool."""
        for replica in self.replicas:
            replica.database.close_all()


def describe(error):
    """One line about ``error`` without a credential (driver messages name no password)."""
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def _lsn_text(value):
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


_current = ReplicaSet()


def configure(settings, *, monotonic=time.monotonic):
    """Build the app's replica set from ``settings`` (closing the previous one)."""
    global _current
    previous, _current = _current, ReplicaSet(settings, monotonic=monotonic)
    previous.close()
    return _current


def current():
    """The replica set ``configure`` built last (empty before)."""
    return _current
