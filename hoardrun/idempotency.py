"""Idempotency keys: a money-moving request sent twice moves money once.

A client names a request with an ``Idempotency-Key`` header; keys are per
user. The first request with a key runs; every later one with the same key
and the same request (method, path and canonical body) gets the first
response back, same status and same body, without running again. The same
key with a different request is refused (``IdempotencyKeyReused``, 422).

How "once" is guaranteed, on both backends, without a lock table or a
sweeper: the key row (with the response) is INSERTed into
``idempotency_keys`` (UNIQUE (user_id, key)) in the SAME database
transaction as the movement, as its last write.

* Two requests with one key may both start; the second to reach its key
  INSERT waits on the unique index for the first to commit, then fails with
  a unique violation, so its whole transaction, movement included, rolls
  back, and it replays the stored response instead. If the first rolls back
  (crash, lost connection, unexpected error), nothing of it remains and the
  second commits: money moves once, and no key is ever left half-written.

Refusals the domain raises on purpose (4xx ``HoardRunError``: insufficient
funds, not found, …) are part of the first response and are stored too, on
their own after the refused transaction rolled back (it changed nothing).
Unexpected errors (5xx) store nothing, so the client may retry with the
same key.

Keys are kept for ``ttl`` seconds (``HOARDRUN_IDEMPOTENCY_TTL``, 7 days by
default, at least a day): inside that window a replay returns the stored
response byte for byte; after it the key is treated as new (the lapsed row
is deleted and the request runs), and ``prune()`` (``invoke db.prune``)
deletes lapsed rows in batches so the table does not grow forever.

The statements are raw SQL: this runs on every money-moving POST
(PERFORMANCE.md item 6).
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import peewee as pw

from . import errors
from .config import DEFAULT_IDEMPOTENCY_TTL
from .db import db, driver_error, execute_deferred
from .ids import as_uuid

HEADER = "Idempotency-Key"
KEY_MAX_LENGTH = 255
#: How long a key replays (``HOARDRUN_IDEMPOTENCY_TTL``); older keys are new again.
DEFAULT_TTL = DEFAULT_IDEMPOTENCY_TTL
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class Outcome:
    """The response to send: ``status``, ``body`` (JSON text) and whether it is a replay."""

    status: int
    body: str
    replayed: bool


def check_key(key):
    """Return ``key`` if usable (1-255 printable ASCII characters), else ValidationError."""
    if key is None:
        return None
    # ASCII and printable is " " to "~"; without the space, "!" to "~".
    if (not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX_LENGTH
            or not (key.isascii() and key.isprintable()) or " " in key):
        raise errors.ValidationError(
            f"{HEADER} must be 1 to {KEY_MAX_LENGTH} printable ASCII characters without spaces",
            field=HEADER)
    return key


def _canonical_default(value):
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} cannot be part of a request fingerprint")


def request_hash(method, path, body):
    """SHA-256 of method, path and the body as canonical JSON (sorted keys).

    Two bodies that differ only in key order or whitespace hash the same;
    ``"10.0"`` and ``"10.00"`` do not (the client sent different requests).
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=_canonical_default)
    text = f"{method.upper()}\n{path}\n{canonical}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



def run(user_id, key, fingerprint, action, *, on_error, ttl=DEFAULT_TTL):
    """Run ``action`` once per (user, key) within ``ttl`` seconds; return an ``Outcome``.

    ``action()`` returns ``(status, body_text)``; ``on_error(exc)`` turns a
    4xx ``HoardRunError`` raised by ``action`` into ``(status, body_text)``.
    Without a key the action simply runs in one transaction, and its errors
    propagate. A key first used more than ``ttl`` seconds ago is treated as
    new: its old row is deleted and the request runs.
    """
    if key is None:
        with db.atomic():
            status, body = action()
        return Outcome(status, body, False)

    user = as_uuid(user_id).hex
    # Twice at most: the second attempt follows the deletion of a lapsed row,
    # so any row it meets was written moments ago by a twin and replays.
    for _ in range(2):
        outcome = _attempt(user, key, fingerprint, action, on_error)
        if outcome is None:
            outcome = _replay(user, key, fingerprint, ttl)
        if outcome is not None:
            return outcome
    raise errors.Conflict("this key was reused concurrently; retry")  # pragma: no cover


def _attempt(user, key, fingerprint, action, on_error):
    """Run ``action`` and store its response under ``key``; None when the key exists."""
    store = ("INSERT INTO idempotency_keys (id, user_id, key, request_hash, response_status, "
             "response_body) VALUES (%s, %s, %s, %s, %s, %s)")
    try:
        try:
            with db.atomic():
                status, body = action()
                # The key and the response land with the movement's COMMIT (on
                # PostgreSQL in the same round trip). A concurrent twin ran its
                # own movement meanwhile; its key INSERT fails on the unique
                # index at its COMMIT, which rolls that movement back.
                execute_deferred(store, (uuid.uuid4().hex, user, key, fingerprint, status, body))
        except errors.HoardRunError as exc:
            if exc.status >= 500:
                raise
            # A refusal changed nothing; record it on its own, so a retry with
            # this key gets the same answer. If a twin got there first, ours
            # fails the same way and theirs is replayed.
            status, body = on_error(exc)
            db.execute_sql(store, (uuid.uuid4().hex, user, key, fingerprint, status, body))
    except pw.IntegrityError as exc:
        # The key's row exists: its request committed first, so its response
        # is there to replay (unless it has lapsed).
        if not _is_key_conflict(exc):
            raise
        return None
    return Outcome(status, body, False)


def _is_key_conflict(exc):
    """Whether ``exc`` is the UNIQUE (user_id, key) violation of a claim."""
    orig = driver_error(exc)
    constraint = getattr(getattr(orig, "diag", None), "constraint_name", None)
    return constraint == "idempotency_keys_user_id_key"


def _replay(user, key, fingerprint, ttl):
    """The stored response for ``key``; None once a lapsed row is gone (run it anew)."""
    row = db.execute_sql(
        "SELECT request_hash, response_status, response_body, "
        "created_at < now() - make_interval(secs => %s) FROM idempotency_keys "
        "WHERE user_id = %s AND key = %s",
        (ttl, user, key)).fetchone()
    if row is None:
        return None  # pruned between our conflict and this read: the key is new again
    stored_hash, status, body, lapsed = row
    if lapsed:
        # Only a row that is still lapsed goes, so a twin's fresh row survives.
        db.execute_sql(
            "DELETE FROM idempotency_keys WHERE user_id = %s AND key = %s "
            "AND created_at < now() - make_interval(secs => %s)",
            (user, key, ttl))
        return None
    if stored_hash != fingerprint:
        raise errors.IdempotencyKeyReused(
            f"this {HEADER} was already used for a different request; "
            "use a new key for a new request", field=HEADER)
    if status is None:  # pragma: no cover - claim and response commit together
        raise errors.Conflict("the first request with this key has not finished; retry")
    return Outcome(int(status), body, True)


def prune(ttl=DEFAULT_TTL, *, batch_size=PRUNE_BATCH):
    """Delete keys first used more than ``ttl`` seconds ago; return how many.

    Each batch is its own short transaction (``SKIP LOCKED``), so pruning a
    large backlog never holds many locks or one long transaction next to
    live traffic, and two prunes at once share the work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid: expected an integer >= 1")
    total = 0
    while True:
        with db.atomic():
            deleted = db.execute_sql(
                "DELETE FROM idempotency_keys WHERE id IN ("
                " SELECT id FROM idempotency_keys"
                " WHERE created_at < now() - make_interval(secs => %s)"
                " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (ttl, batch_size)).rowcount
        total += deleted
        if deleted < batch_size:
            return total
