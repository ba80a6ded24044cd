"""Card authorizations: ``POST /cards/{id}/authorizations``, ``/authorizations/{id}``,
``…/capture`` and ``…/void`` (``hoardrun.holds``).

Every POST honours an ``Idempotency-Key``. A capture or void of a hold that
is no longer active (already captured, voided or expired) is a 409 problem,
so under any race exactly one resolution wins. Another user's card or
authorization answers 404, exactly like one that does not exist.
"""

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import holds
from ..auth import utcnow
from ..models import HOLD_STATUSES
from ..money import format_amount
from .idempotency import IdempotencyHeaders, idempotent
from .openapi import BEARER, Problem, spec

TAGS = ["cards"]
PREFIX = "/api/v1/authorizations"


class AuthorizationIn(BaseModel):
    """Reserve money on the card's account for a merchant to capture later."""

    model_config = ConfigDict(extra="forbid")

    merchant_name: str = Field(min_length=1, max_length=200)
    merchant_category: str = Field(min_length=1, max_length=64, examples=["7011"])
    amount: str = Field(min_length=1, max_length=40, examples=["120.00"],
                        description="Decimal string, > 0")
    currency: str = Field(min_length=3, max_length=3, examples=["USD"])
    channel: Literal["online", "contactless", "chip"]
    international: bool = False
    description: str | None = Field(None, max_length=500)
    expires_in_days: int = Field(holds.DEFAULT_EXPIRY_DAYS, ge=1, le=holds.MAX_EXPIRY_DAYS,
                                 strict=True,
                                 description="The hold releases itself this many days "
                                             "after authorization unless captured or voided")


class CaptureIn(BaseModel):
    """Capture once; omit ``amount`` to capture all that is held."""

    model_config = ConfigDict(extra="forbid")

    amount: str | None = Field(None, min_length=1, max_length=40, examples=["95.50"],
                               description="Decimal string, > 0 and at most the held amount; "
                                           "the rest is released")


class AuthorizationOut(BaseModel):
    """A hold: it reduces the account's available balance while ``active``."""

    id: UUID
    card_id: UUID
    account_id: UUID
    status: Literal[HOLD_STATUSES]
    amount: str = Field(description="What was authorized (held while active)")
    currency: str
    captured_amount: str | None = Field(description="Set once captured")
    released_amount: str | None = Field(description="What went back to the available "
                                                    "balance once no longer active")
    merchant_name: str
    merchant_category: str
    channel: str
    international: bool
    description: str | None
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None = Field(description="When it was captured, voided or "
                                                     "expired")
    payment_id: UUID | None = Field(description="The capture's card payment entry (refund it "
                                                "at /cards/{card_id}/payments/{payment_id}"
                                                "/refunds)")
    balance_after: str | None = Field(description="The account's balance after the capture")


def _amount(minor, currency):
    return None if minor is None else format_amount(minor, currency)


def render_authorization(a):
    """``holds.Authorization`` as the ``AuthorizationOut`` dict."""
    h, currency = a.hold, a.hold.currency
    return {"id": h.id, "card_id": h.card_id, "account_id": h.account_id, "status": a.status,
            "amount": format_amount(h.amount, currency), "currency": currency,
            "captured_amount": _amount(h.captured_amount, currency),
            "released_amount": _amount(a.released, currency),
            "merchant_name": h.merchant_name, "merchant_category": h.merchant_category,
            "channel": h.channel, "international": h.international,
            "description": h.description, "created_at": h.created_at,
            "expires_at": h.expires_at, "resolved_at": h.resolved_at,
            "payment_id": a.payment_id, "balance_after": _amount(a.balance_after, currency)}


_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem, HTTP_422=Problem)


class Authorizations:
    """``POST /cards/{card_id}/authorizations`` (Idempotency-Key honoured)."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(json=AuthorizationIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=AuthorizationOut, **_ERRORS), security=BEARER,
                   tags=TAGS)
    def on_post(self, req, resp, card_id):
        """Authorize a card payment: hold the amount on the card's account.

        The same checks as a payment (``card-not-active``, ``card-expired``,
        ``channel-disabled``, ``daily-limit-exceeded``,
        ``monthly-limit-exceeded``, ``insufficient-funds``): the hold lowers
        the account's ``available_balance``, not its ``balance``, and counts
        against the card's limits while active.
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_authorization(holds.authorize(
            req.context.user.id, card_id, amount=body.amount, currency=body.currency,
            merchant_name=body.merchant_name, merchant_category=body.merchant_category,
            channel=body.channel, international=body.international,
            description=body.description, expires_in_days=body.expires_in_days,
            now=self.clock(), request_id=req.context.request_id)), PREFIX,
            kind="card_authorization")


class Authorization:
    """``GET /authorizations/{authorization_id}``."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(resp=Response(HTTP_200=AuthorizationOut, HTTP_401=Problem,
                                 HTTP_404=Problem), security=BEARER, tags=TAGS)
    def on_get(self, req, resp, authorization_id):
        """One of my authorizations (``expired`` as soon as its expiry has passed)."""
        resp.media = render_authorization(holds.get(req.context.user.id, authorization_id,
                                                    now=self.clock()))


class Capture:
    """``POST /authorizations/{authorization_id}/capture`` (Idempotency-Key honoured)."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(json=CaptureIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_200=AuthorizationOut, HTTP_409=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, authorization_id):
        """Capture the authorization once, for at most its amount; the rest is released.

        Posts a card payment (refundable like one). 409
        ``authorization-resolved`` when it was already captured or voided,
        409 ``authorization-expired`` past its expiry; 422
        ``capture-exceeds-authorization`` above the held amount.
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_authorization(holds.capture(
            req.context.user.id, authorization_id, amount=body.amount, now=self.clock(),
            request_id=req.context.request_id)), PREFIX, kind="card_capture", status=200)


class Void:
    """``POST /authorizations/{authorization_id}/void`` (Idempotency-Key honoured)."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(headers=IdempotencyHeaders,
                   resp=Response(HTTP_200=AuthorizationOut, HTTP_409=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, authorization_id):
        """Void the authorization: all of it goes back to the available balance.

        409 ``authorization-resolved`` when it was already captured or voided,
        409 ``authorization-expired`` past its expiry.
        """
        idempotent(req, resp, lambda: render_authorization(holds.void(
            req.context.user.id, authorization_id, now=self.clock(),
            request_id=req.context.request_id)), PREFIX, kind="card_void", status=200)


def mount(app, *, clock=utcnow):
    """Add the authorization routes to ``app``."""
    one = f"{PREFIX}/{{authorization_id:uuid}}"
    app.add_route("/api/v1/cards/{card_id:uuid}/authorizations", Authorizations(clock))
    app.add_route(one, Authorization(clock))
    app.add_route(f"{one}/capture", Capture(clock))
    app.add_route(f"{one}/void", Void(clock))
