"""Ids from the outside world: a UUID, or the NotFound a client would get anyway."""

import uuid

from . import errors


def as_uuid(value):
    """``value`` (a ``uuid.UUID``, or the text or hex of one we produced) as a ``uuid.UUID``.

    For ids that come from our own database or code, not from a client (use
    ``parse_id`` for those). The driver already hands ``uuid`` columns over as
    ``uuid.UUID``: building one again from its text, on every row, costs a
    parse of 32 hex digits for nothing.
    """
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def parse_id(value, what=None, *, field=None):
    """``value`` as a ``uuid.UUID``; anything else is ``NotFound("<what> not found")``.

    A malformed id names nothing that exists, so it is answered exactly like
    an id that exists for someone else: 404, never a validation error that
    would tell the two apart.
    """
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise errors.NotFound(f"{what} not found" if what else "not found",
                              field=field) from None
