"""Keyset (cursor) pagination for newest-first lists ordered by (created_at, id).

A cursor is opaque to clients: url-safe base64 of the last row's stored
``created_at`` and id. Pages never skip or repeat a row when rows are added
between requests, and each page is one indexed range scan (no OFFSET).

NOTE: the cursor keeps ``created_at`` exactly as the database stores it (cast
to text), not as a parsed datetime. On SQLite a row written by ``DEFAULT
CURRENT_TIMESTAMP`` holds ``2025-01-01 10:00:00`` while our own writes hold
``…10:00:00.000000``; a parsed-and-reformatted value would compare unequal
to the stored text and repeat rows across pages.
"""

import base64
import binascii
import json
import uuid
from datetime import datetime

from .errors import InvalidCursor, ValidationError

DEFAULT_LIMIT = 50
MAX_LIMIT = 100


def check_limit(limit):
    """Return ``limit`` (default 50) if it is an int in 1..100, else raise ValidationError."""
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"limit must be 1 to {MAX_LIMIT}", field="limit")
    return limit


def encode_cursor(created_raw, row_id):
    """The opaque cursor after the row with stored ``created_raw`` and ``row_id``."""
    payload = json.dumps([str(created_raw), str(row_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor):
    """Return ``(created_raw, uuid)`` from a cursor; InvalidCursor (422, ``cursor``) if bad."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_raw, row_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        # Both parts go into SQL as parameters: check their shape so a forged
        # cursor is a 422, not a database error.
        datetime.fromisoformat(created_raw)
        return created_raw, uuid.UUID(row_id)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise InvalidCursor("cursor is not valid", field="cursor") from None


def page(query, model, *, limit=None, cursor=None):
    """Run ``query`` (a select on ``model``) newest first; return ``(rows, next_cursor)``.

    ``next_cursor`` is None on the last page. ``model`` needs ``created_at`` and ``id``.
    """
    limit = check_limit(limit)
    created, pk = model.created_at, model.id
    query = query.select_extend(created.cast("TEXT").alias("cursor_created"))
    if cursor:
        created_raw, last_id = decode_cursor(cursor)
        query = query.where((created < created_raw)
                            | ((created == created_raw) & (pk < last_id)))
    rows = list(query.order_by(created.desc(), pk.desc()).limit(limit + 1))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].cursor_created, rows[-1].id)
