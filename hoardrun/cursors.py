"""Keyset pagination with opaque, tamper-evident cursors.

Lists are newest first on ``(created_at, id)``: each page is one indexed
range scan (no OFFSET), and rows added meanwhile never shift a page in
progress. A cursor is url-safe base64 of a small JSON payload (the list it
belongs to, a fingerprint of the filters, the last row's stored
``created_at`` and id) plus a truncated HMAC-SHA256 of it under the
server's secret key. A cursor that was edited, belongs to another list or
was made with other filters is ``InvalidCursor`` (422), never a database
error.

NOTE: the cursor keeps ``created_at`` with its full microsecond precision,
so the keyset comparison is against the very value stored and a page
boundary can never repeat or skip a row.
"""

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from . import errors
from .ids import as_uuid

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


@dataclass(frozen=True)
class Page:
    """One page of a list, and the cursor of the next (None on the last page)."""

    items: list
    next_cursor: str | None
    limit: int


def check_limit(limit):
    """``limit`` if it is 1..100; the default (20) when None."""
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise errors.ValidationError(f"limit must be 1 to {MAX_LIMIT}", field="limit")
    return limit


def _sign(secret, payload):
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, payload, hashlib.sha256).digest()[:16]


def _b64(data):
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))


def _fingerprint(filters):
    canonical = json.dumps(filters, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def encode_cursor(secret, scope, filters, created_raw, row_id):
    """The signed cursor for the page after the row (``created_raw``, ``row_id``)."""
    created = created_raw.isoformat() if isinstance(created_raw, datetime) else str(created_raw)
    payload = json.dumps([scope, _fingerprint(filters), created, str(row_id)],
                         separators=(",", ":")).encode("utf-8")
    return f"{_b64(payload)}.{_b64(_sign(secret, payload))}"


def decode_cursor(secret, scope, filters, cursor):
    """``(created, id)`` from a cursor this server made for this list and these filters."""
    bad = errors.InvalidCursor("cursor is not valid for this list; start again without it",
                               field="cursor")
    try:
        body, _, signature = cursor.partition(".")
        payload = _unb64(body)
        if not hmac.compare_digest(_unb64(signature), _sign(secret, payload)):
            raise bad
        cursor_scope, cursor_filters, created, row_id = json.loads(payload)
    except (ValueError, TypeError, UnicodeError, binascii.Error, AttributeError):
        raise bad from None
    if cursor_scope != scope or cursor_filters != _fingerprint(filters):
        raise bad
    parsed = datetime.fromisoformat(created)
    return parsed, uuid.UUID(row_id)


def page_of(rows, limit, make, secret, scope, filters, created_index):
    """Turn ``limit + 1`` fetched rows into a Page (the extra row only says "more")."""
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor(secret, scope, filters, last[created_index], as_uuid(last[0]))
    return Page([make(row) for row in rows], next_cursor, limit)


def keyset(conditions, params, alias, secret, scope, filters, cursor):
    """Add "after the cursor's row" to ``conditions``/``params`` (SQL with %s marks)."""
    if cursor:
        created, last_id = decode_cursor(secret, scope, filters, cursor)
        conditions.append(f"({alias}.created_at, {alias}.id) < (%s, %s)")
        params.extend([created, last_id.hex])


def page_query(query, model, *, secret, scope, filters=None, limit=None, cursor=None):
    """Run a peewee select on ``model`` newest first; return a Page.

    For the cold lists (admin, cards) that are built with the ORM; ``model``
    needs ``created_at`` and ``id``. Same cursors as the raw-SQL lists.
    """
    limit = check_limit(limit)
    filters = filters or {}
    created, pk = model.created_at, model.id
    # The stored value as text, microseconds included, as the module NOTE explains.
    query = query.select_extend(created.cast("TEXT").alias("cursor_created"))
    if cursor:
        created_raw, last_id = decode_cursor(secret, scope, filters, cursor)
        query = query.where((created < created_raw)
                            | ((created == created_raw) & (pk < last_id)))
    rows = list(query.order_by(created.desc(), pk.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (encode_cursor(secret, scope, filters, rows[-1].cursor_created, rows[-1].id)
                   if more else None)
    return Page(rows, next_cursor, limit)
