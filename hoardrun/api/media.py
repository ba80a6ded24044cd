"""The one JSON handler: Decimal in, Decimal/UUID/datetime out.

Money never passes through a float: numbers with a fraction or exponent
are parsed as ``Decimal`` (the money parser then refuses what it must), and
``NaN``/``Infinity``, a key given twice in one object and absurdly deep
nesting are refused as malformed JSON (400). A body must say it is JSON:
one without ``Content-Type`` is refused (415, ``RequestContext``). Out, ``Decimal`` is written as a string so a client's float
parser cannot round it, UUIDs as strings and datetimes as UTC ISO 8601
with ``Z``.
"""

import json
from datetime import date, datetime, timezone
from decimal import Decimal
from functools import partial
from uuid import UUID

import falcon

JSON = falcon.MEDIA_JSON
PROBLEM_JSON = "application/problem+json"


def _refuse_constant(name):
    # json.loads calls this for NaN, Infinity and -Infinity; a ValueError is
    # turned into falcon's MediaMalformedError (400) by the handler.
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs):
    # json.loads would keep the LAST of two equal keys, so
    # {"amount":"1.00","amount":"900.00"} would deposit 900.00 while a proxy,
    # a log or a signature check upstream may have read 1.00: refuse it.
    obj = {}
    for key, value in pairs:
        if key in obj:
            shown = key if len(key) <= 40 and key.isprintable() else "a key"
            raise ValueError(f"{shown!r} appears twice in one JSON object")
        obj[key] = value
    return obj


def iso_utc(value):
    """``value`` (aware or naive-UTC datetime) as ISO 8601 in UTC with ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _default(value):
    # Most frequent first: a history page asks about ~100 ids and 20 times.
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite Decimal cannot be written as JSON")
        return str(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def loads(text):
    """JSON text to Python, numbers with a fraction or exponent as ``Decimal``."""
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        # A body nested deeper than the interpreter's recursion limit (e.g.
        # 10,000 ``[``) is hostile, not a server fault: a ValueError makes it
        # falcon's 400 malformed-JSON instead of an unhandled 500.
        raise ValueError("JSON nested too deeply") from None


dumps = partial(json.dumps, default=_default, ensure_ascii=False, allow_nan=False,
                separators=(",", ":"))


def json_handler():
    """A falcon media handler using ``loads``/``dumps`` above."""
    return falcon.media.JSONHandler(dumps=dumps, loads=loads)


def configure(app):
    """Install the handler: only JSON is accepted in request bodies.

    Dropping falcon's default form and multipart handlers means a body sent
    as anything but JSON is answered 415 rather than half-parsed. Responses
    may also be ``application/problem+json`` (the error serializer's type).
    """
    handler = json_handler()
    app.req_options.media_handlers = falcon.media.Handlers({JSON: handler})
    app.resp_options.media_handlers = falcon.media.Handlers({JSON: handler,
                                                             PROBLEM_JSON: handler})
    # An EMPTY request without Content-Type still parses as JSON (nothing),
    # so bodiless POSTs work; a body without one is refused with 415 by
    # RequestContext before anyone reads it.
    app.req_options.default_media_type = JSON
