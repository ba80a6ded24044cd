"""The idempotent POST: every money-moving route runs its movement through here.

A POST with an ``Idempotency-Key`` header (``IdempotencyHeaders``) runs its
movement at most once per user and key: the first response is stored with
the movement, in the same transaction (``hoardrun.idempotency``), and a
replay (same key, method, path and body) gets it back byte for byte with the
same status and ``Idempotent-Replayed: true``; the same key with another body
is a 422 ``idempotency-key-reused``. Refusals (insufficient funds, frozen
account, ...) are part of the first response and replay too.
"""

import json
from types import SimpleNamespace

from pydantic import AliasChoices, BaseModel, Field

from .. import errors, idempotency
from . import problems
from .media import JSON, PROBLEM_JSON, dumps

REPLAYED_HEADER = "Idempotent-Replayed"


class IdempotencyHeaders(BaseModel):
    """``Idempotency-Key``: send the same key to retry a request safely."""

    idempotency_key: str | None = Field(
        None, min_length=1, max_length=idempotency.KEY_MAX_LENGTH,
        # falcon hands headers over upper-cased; the document shows the usual spelling.
        validation_alias=AliasChoices(idempotency.HEADER, idempotency.HEADER.upper()),
        description="Optional, per user. A retry with the same key and body returns the "
                    "first response without moving money again.")


def _problem(req, exc):
    """``exc`` (a 4xx domain error) as ``(status, problem JSON text)``, exactly as the
    error serializer would write it, so the stored first response is the real one."""
    try:
        problems.handle_domain_error(req, None, exc, None)
    except problems.Problem as problem:
        out = SimpleNamespace(content_type=None, data=None)
        problems.serialize(req, out, problem)
        return problem.status_code, out.data.decode("utf-8")
    raise AssertionError("handle_domain_error always raises")  # pragma: no cover


def idempotent(req, resp, action, location_prefix, *, kind, status=201):
    """Run ``action`` (returns the body dict) under the request's Idempotency-Key.

    The answer is ``status`` (201 by default, with ``Location:
    <location_prefix>/<id>`` unless ``location_prefix`` is None). ``kind``
    names the movement; ``req.context.movement`` is set to ``(kind, outcome,
    reason)`` (``posted``, ``refused`` with the problem code, or
    ``replayed``) for the metrics middleware.
    """
    key = idempotency.check_key(req.context.headers.idempotency_key)
    fingerprint = idempotency.request_hash(req.method, req.path,
                                           req.get_media(default_when_empty={}))
    refusals = []
    made = {}

    def act():
        body = made["body"] = action()
        return status, dumps(body)

    def refused(exc):
        refusals.append(exc.code)
        return _problem(req, exc)

    try:
        outcome = idempotency.run(req.context.user.id, key, fingerprint, act, on_error=refused,
                                  ttl=req.context.idempotency_ttl)
    except errors.HoardRunError as exc:
        if exc.status < 500:  # without a key a refusal propagates as the problem itself
            req.context.movement = (kind, "refused", exc.code)
        raise
    if outcome.replayed:
        req.context.movement = (kind, "replayed", "")
    elif outcome.status >= 400:
        req.context.movement = (kind, "refused", refusals[-1])
    else:
        req.context.movement = (kind, "posted", "")
    resp.status = outcome.status
    resp.content_type = JSON if outcome.status < 400 else PROBLEM_JSON
    resp.data = outcome.body.encode("utf-8")
    if outcome.status == 201 and location_prefix is not None:
        # A replay's body is all there is; a first answer's dict is still at hand.
        made_id = made["body"]["id"] if not outcome.replayed else json.loads(outcome.body)["id"]
        resp.location = f"{location_prefix}/{made_id}"
    if key is not None:
        resp.set_header(REPLAYED_HEADER, "true" if outcome.replayed else "false")
