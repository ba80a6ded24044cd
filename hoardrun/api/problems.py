"""Errors in one place: every failure leaves as ``application/problem+json``.

RFC 9457 bodies: ``type`` (``https://hoardrun.dev/problems/<code>``),
``title``, ``status``, ``detail``, ``instance`` (the path), ``request_id``
and, for validation, ``errors: [{field, detail}]``.

* Domain errors (``hoardrun.errors.HoardRunError``) map by their own
  ``status``/``code``/``title``: adding a domain error needs no code here.
  A refused batch adds ``legs: [{index, type, detail}]``, one per failing leg.
  A 401 carries ``WWW-Authenticate: Bearer``; an error raised with
  ``retry_after=<seconds>`` (e.g. a login lockout) carries ``Retry-After``.
* ``hoardrun.db.UNAVAILABLE_ERRORS`` become 503 with ``Retry-After``.
* falcon's own errors (404, 405 + Allow, 400 malformed JSON, 413, 415) pass
  through the same serializer.
* Anything else is a 500 whose body carries only the request id; the
  traceback goes to the log under that id.

No exception text that could hold SQL or a credential is copied into a body:
only domain errors (written for users) and falcon's errors carry a detail.
"""

import logging
from http import HTTPStatus

import falcon

from .. import errors
from ..db import UNAVAILABLE_ERRORS
from .media import PROBLEM_JSON, dumps

log = logging.getLogger("hoardrun.api")

TYPE_BASE = "https://hoardrun.dev/problems/"
RETRY_AFTER_SECONDS = "5"

# falcon raises these itself; their problem codes by status.
_HTTP_CODES = {
    400: "malformed-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    411: "length-required",
    413: "content-too-large",
    414: "uri-too-long",
    415: "unsupported-media-type",
    422: "validation-error",
    429: "too-many-requests",
    500: "internal-error",
    503: "service-unavailable",
}


class Problem(falcon.HTTPError):
    """An HTTPError that knows its problem code and validation errors."""

    def __init__(self, status, code, title, detail=None, *, errors=None, headers=None,
                 extensions=None):
        super().__init__(status, title=title, description=detail, headers=headers)
        self.code = code
        self.errors = errors
        # RFC 9457 extension members, e.g. ``legs`` of a refused batch.
        self.extensions = extensions


def problem_type(code):
    """The problem ``type`` URI for ``code``."""
    return TYPE_BASE + code


def _title(error, status):
    title = error.title or ""
    # falcon's default titles are status lines ("404 Not Found"): RFC 9457
    # wants a short summary, so use the reason phrase instead.
    if not title or title[:3].isdigit():
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "Error"
    return title


def serialize(req, resp, error):
    """falcon error serializer: write ``error`` as problem+json."""
    status = error.status_code
    code = getattr(error, "code", None) or _HTTP_CODES.get(status) or (
        "client-error" if status < 500 else "server-error")
    title = _title(error, status)
    body = {
        "type": problem_type(code),
        "title": title,
        "status": status,
        "detail": error.description or title,
        "instance": req.path,
    }
    field_errors = getattr(error, "errors", None)
    if field_errors:
        body["errors"] = field_errors
    body.update(getattr(error, "extensions", None) or {})
    request_id = getattr(req.context, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    resp.content_type = PROBLEM_JSON
    resp.data = dumps(body).encode("utf-8")


def handle_domain_error(req, resp, ex, params):
    """Map a ``HoardRunError`` subclass once, by its class attributes."""
    headers = None
    if ex.status >= 500:
        # A 5xx from the domain (ConfigError, DatabaseUnavailable) may carry
        # internals in its text: log it, say only what kind of failure it is.
        log.error("%s request_id=%s: %s", ex.code, _request_id(req), ex.detail)
        detail = ex.title
        if ex.status == 503:
            headers = {"Retry-After": RETRY_AFTER_SECONDS}
    else:
        detail = ex.detail
    if ex.status == 401:
        # RFC 6750: a 401 names the scheme the client should authenticate with.
        headers = {"WWW-Authenticate": 'Bearer realm="hoardrun"'}
    retry_after = ex.extra.get("retry_after")
    if retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(int(retry_after))}
    field_errors = ex.extra.get("errors")
    if field_errors is None and ex.field:
        field_errors = [{"field": ex.field, "detail": ex.detail}]
    extensions = None
    legs = ex.extra.get("legs")
    if legs is not None:
        # Each refused leg of a batch, typed like a problem of its own.
        extensions = {"legs": [dict(leg, type=problem_type(leg["type"])) for leg in legs]}
    raise Problem(ex.status, ex.code, ex.title, detail, errors=field_errors, headers=headers,
                  extensions=extensions)


def handle_unavailable(req, resp, ex, params):
    """The database is not there (down, refused, pool exhausted): 503 + Retry-After."""
    # Only the exception class is logged here: driver messages can be long,
    # and the operator gets the detail from /api/health/database.
    log.warning("database unavailable request_id=%s: %s", _request_id(req),
                type(ex).__name__)
    raise Problem(503, errors.DatabaseUnavailable.code, errors.DatabaseUnavailable.title,
                  "The database is not available right now; retry later.",
                  headers={"Retry-After": RETRY_AFTER_SECONDS})


def handle_unexpected(req, resp, ex, params):
    """Anything unplanned: the traceback to the log, only the request id to the client."""
    request_id = _request_id(req)
    log.error("unhandled %s request_id=%s", type(ex).__name__, request_id, exc_info=ex)
    raise Problem(500, "internal-error", "Internal server error",
                  f"An unexpected error occurred. Quote request id {request_id} "
                  "when reporting it.")


def _request_id(req):
    return getattr(req.context, "request_id", None)


def install(app):
    """Register the serializer and the handlers on ``app`` (most specific wins)."""
    app.set_error_serializer(serialize)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(list(UNAVAILABLE_ERRORS), handle_unavailable)
    app.add_error_handler(errors.HoardRunError, handle_domain_error)
