"""Ids from the outside world: a UUID, or the NotFound a client would get anyway."""

import uuid

from . import errors


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
