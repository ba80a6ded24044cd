"""Request middleware: request id, body limit, one log line, connection return.

``RequestContext`` does per request, in this order:

* takes ``X-Request-ID`` if it is a short safe token (≤ 64 of
  ``[A-Za-z0-9._-]``), otherwise makes one (uuid4 hex); it is
  ``req.context.request_id``, echoed in the response and in the log line;
* refuses a body larger than ``settings.max_body_bytes`` with 413 from its
  declared length, and a body without ``Content-Type`` with 415, before
  anyone reads it (guessing JSON for an unlabelled body lets a form or a
  text body of a cross-site request be read as a money movement);
* after the response (also on errors): hands this thread's database
  connection back to the pool if the request used one, and logs one line
  (method, path, status, duration, request id; never the query string,
  body or headers, which may hold tokens or passwords). The path is the
  client's text, decoded: it is logged escaped (``log_safe``), so a
  ``%0d%0a`` cannot forge a second log line nor ``%1b`` a terminal escape.

It never opens a connection or a transaction: peewee connects lazily on
first use, so routes that never touch the database (liveness, docs) never
check one out (PERFORMANCE.md item 4).
"""

import functools
import logging
import random
import re
import time

import falcon

from .. import db as dbm
from .. import idempotency, replicas

access_log = logging.getLogger("hoardrun.access")

REQUEST_ID_HEADER = "X-Request-ID"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def log_safe(text):
    """``text`` with every non-printable character escaped (``\\r``, ``\\x1b``, ``\\u202e``).

    A backslash is escaped too, so an escaped line cannot be mistaken for
    one that held the escape sequence literally.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode()
                   for c in text)


def new_request_id():
    """A fresh request id: 32 random hex characters.

    From ``random``'s generator, not ``uuid4``: an id correlates log lines
    and audit rows and guards nothing, and ``os.urandom`` is a system call
    that hands the GIL to another of the server's threads on every request.
    ``random`` reseeds itself in each forked worker, so two workers do not
    repeat each other's ids.
    """
    return "%032x" % random.getrandbits(128)


class RequestContext:
    """See the module docstring; one instance serves every thread."""

    def __init__(self, *, max_body_bytes, id_factory=new_request_id, timer=time.perf_counter,
                 validate_responses=True, idempotency_ttl=idempotency.DEFAULT_TTL):
        self.max_body_bytes = max_body_bytes
        self.idempotency_ttl = idempotency_ttl
        self.id_factory = id_factory
        self.timer = timer
        self.validate_responses = validate_responses

    def process_request(self, req, resp):
        req.context.started = self.timer()
        req.context.validate_responses = self.validate_responses
        req.context.idempotency_ttl = self.idempotency_ttl
        given = req.get_header(REQUEST_ID_HEADER)
        # A client-chosen id goes into our logs and audit rows: only a short
        # token is taken as is, so nobody can inject log lines or markup.
        if given is not None and _SAFE_REQUEST_ID.fullmatch(given):
            req.context.request_id = given
        else:
            req.context.request_id = self.id_factory()
        length = req.content_length
        if length is not None and length > self.max_body_bytes:
            raise falcon.HTTPContentTooLarge(
                description=f"The request body is {length} bytes; the limit is "
                            f"{self.max_body_bytes} bytes.")
        has_body = bool(length) or req.get_header("Transfer-Encoding") is not None
        if has_body and not req.content_type:
            raise falcon.HTTPUnsupportedMediaType(
                description="The request has a body but no Content-Type: send it as "
                            "application/json.")

    def process_response(self, req, resp, resource, req_succeeded):
        user = getattr(req.context, "user", None)
        if user is not None and req.method not in SAFE_METHODS:
            # Read-your-writes: whatever this request wrote, the caller's next
            # read waits for a replica that has it (hoardrun.replicas).
            replicas.current().wrote(user.id)
        try:
            dbm.release_connection()
        finally:
            request_id = getattr(req.context, "request_id", None)
            if request_id is not None:
                resp.set_header(REQUEST_ID_HEADER, request_id)
            started = getattr(req.context, "started", None)
            duration_ms = (self.timer() - started) * 1000 if started is not None else 0.0
            status = resp.status_code
            path = log_safe(req.path)
            access_log.info(
                "%s %s %s %.1fms request_id=%s", req.method, path, status, duration_ms,
                request_id,
                extra={"method": req.method, "path": path, "status": status,
                       "duration_ms": round(duration_ms, 3), "request_id": request_id})


def replica_reads(responder):
    """Let a read-only responder's queries come from a replica fresh enough for the caller.

    ``hoardrun.replicas.choose`` picks one (or None: the primary) without a
    round trip. If the replica fails the read (down, or a query cancelled by
    recovery), it is marked down and the responder runs again on the
    primary: the caller never sees a replica's failure. Only for responders
    that write nothing: a standby refuses writes, and that stays a 500.
    Sits below ``spec.validate``, so the query string is parsed once.
    """
    @functools.wraps(responder)
    def read(resource, req, resp, *args, **kwargs):
        replica_set = replicas.current()
        user = getattr(req.context, "user", None)
        replica = replica_set.choose(user.id if user else None) if replica_set else None
        if replica is not None:
            try:
                with dbm.reading_from(replica.database):
                    return responder(resource, req, resp, *args, **kwargs)
            except dbm.UNAVAILABLE_ERRORS as error:
                replica_set.failed(replica, error)
        return responder(resource, req, resp, *args, **kwargs)
    return read


class CORS(falcon.CORSMiddleware):
    """falcon's CORS middleware, plus ``Vary: Origin`` on every answer.

    The allow headers depend on the request's ``Origin`` (and a preflight's
    on what it asks for), so a shared cache must key on them: without
    ``Vary`` a proxy could hand one origin's answer, or a no-CORS answer,
    to another origin's browser.
    """

    def process_response(self, req, resp, resource, req_succeeded):
        super().process_response(req, resp, resource, req_succeeded)
        resp.append_header("Vary", "Origin")
        if req.method == "OPTIONS":
            resp.append_header("Vary", "Access-Control-Request-Method, "
                                       "Access-Control-Request-Headers")
