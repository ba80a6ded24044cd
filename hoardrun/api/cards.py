"""``/api/v1/cards``: issue, read (masked), freeze, limits, controls, cancel, pay, refund.

The full card number is in exactly one response: the 201 of ``POST /cards``
(which takes no Idempotency-Key, so the number is never stored as a
replayable response either). Every other body shows the mask and last four.
Another user's card answers 404, exactly like a card that does not exist.
"""

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import cards
from ..money import format_amount
from .idempotency import IdempotencyHeaders, idempotent
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

TAGS = ["cards"]
PREFIX = "/api/v1/cards"
# Payments and refunds are ledger entries, readable at GET /transactions/{id}.
TRANSACTIONS = "/api/v1/transactions"


class CardIn(BaseModel):
    """Issue a card on one of my accounts."""

    model_config = ConfigDict(extra="forbid")

    account_id: UUID
    type: Literal["debit", "prepaid"]
    cardholder_name: str = Field(min_length=2, max_length=26,
                                 description="As embossed: letters, spaces, . ' -")


class CardOut(BaseModel):
    """A card as it is shown after issue: masked number only, never a CVV."""

    id: UUID
    account_id: UUID
    type: str
    status: Literal["active", "inactive", "blocked", "expired", "cancelled"]
    cardholder_name: str
    masked_number: str = Field(examples=["**** **** **** 4242"])
    last_four: str
    expiry_month: int
    expiry_year: int
    currency: str
    daily_limit: str = Field(description="Decimal string in the account's currency")
    monthly_limit: str
    online_enabled: bool
    contactless_enabled: bool
    international_enabled: bool
    created_at: datetime
    updated_at: datetime


class IssuedCardOut(CardOut):
    """The issue response: the only time the full number is ever shown."""

    number: str = Field(description="The full card number. Shown once, in this response "
                                    "only; it cannot be retrieved again.")


class CardList(BaseModel):
    items: list[CardOut]
    next_cursor: str | None = None


class CardListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = None


class LimitsIn(BaseModel):
    """New limits as decimal strings in the account's currency; omitted ones stay."""

    model_config = ConfigDict(extra="forbid")

    daily_limit: str | None = Field(None, examples=["500.00"])
    monthly_limit: str | None = Field(None, examples=["2000.00"])


class ControlsIn(BaseModel):
    """Switch channels on or off; omitted ones stay. Chip payments are always allowed."""

    model_config = ConfigDict(extra="forbid")

    online_enabled: bool | None = None
    contactless_enabled: bool | None = None
    international_enabled: bool | None = None


class PaymentIn(BaseModel):
    """A card payment to a merchant."""

    model_config = ConfigDict(extra="forbid")

    merchant_name: str = Field(min_length=1, max_length=200)
    merchant_category: str = Field(min_length=1, max_length=64, examples=["5411"])
    amount: str = Field(examples=["12.34"], description="Decimal string, > 0")
    currency: str = Field(min_length=3, max_length=3, examples=["USD"])
    channel: Literal["online", "contactless", "chip"]
    international: bool = False
    description: str | None = Field(None, max_length=500)


class PaymentOut(BaseModel):
    id: UUID = Field(description="The payment's ledger entry; refunds name it")
    card_id: UUID
    account_id: UUID
    amount: str
    currency: str
    merchant_name: str
    merchant_category: str
    channel: str
    international: bool
    balance_after: str
    status: Literal["completed"]
    created_at: datetime


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: str = Field(examples=["5.00"], description="Decimal string, > 0; all refunds "
                                                      "together cannot exceed the payment")


class RefundOut(BaseModel):
    id: UUID = Field(description="The refund's ledger entry")
    payment_id: UUID
    card_id: UUID
    account_id: UUID
    amount: str
    currency: str
    refunded_total: str
    balance_after: str
    status: Literal["completed"]
    created_at: datetime


def render_card(card):
    """A card as ``CardOut`` (no number)."""
    state = cards.card_state(card)
    currency = state["currency"]
    state.update(daily_limit=format_amount(card.daily_limit, currency),
                 monthly_limit=format_amount(card.monthly_limit, currency),
                 created_at=card.created_at, updated_at=card.updated_at)
    return state


def render_payment(payment, channel, international):
    return {"id": payment.id, "card_id": payment.card_id, "account_id": payment.account_id,
            "amount": format_amount(payment.amount, payment.currency),
            "currency": payment.currency, "merchant_name": payment.merchant_name,
            "merchant_category": payment.merchant_category, "channel": channel,
            "international": international,
            "balance_after": format_amount(payment.balance_after, payment.currency),
            "status": "completed", "created_at": payment.created_at}


def render_refund(refund):
    return {"id": refund.id, "payment_id": refund.payment_id, "card_id": refund.card_id,
            "account_id": refund.account_id,
            "amount": format_amount(refund.amount, refund.currency),
            "currency": refund.currency,
            "refunded_total": format_amount(refund.refunded, refund.currency),
            "balance_after": format_amount(refund.balance_after, refund.currency),
            "status": "completed", "created_at": refund.created_at}


_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem, HTTP_422=Problem)


def _card_response():
    # One Response per operation: spectree adjusts the object it is given.
    return Response(HTTP_200=CardOut, **_ERRORS)


class Cards:
    """``/cards``: my cards; issue a new one."""

    def __init__(self, settings, clock):
        self.settings = settings
        self.clock = clock

    @spec.validate(query=CardListQuery, resp=Response(HTTP_200=CardList, **_ERRORS),
                   security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """List my cards (masked), newest first (cursor pagination)."""
        query = req.context.query
        page = cards.list_cards(req.context.user.id, secret=self.settings.secret_key,
                                limit=query.limit, cursor=query.cursor)
        resp.media = {"items": [render_card(c) for c in page.items],
                      "next_cursor": page.next_cursor}

    @spec.validate(json=CardIn, resp=Response(HTTP_201=IssuedCardOut, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Issue a debit or prepaid card on one of my accounts.

        The full card number is in this response only: it is stored
        encrypted and never shown again (every other response is masked).
        No CVV exists anywhere in HoardRun.
        """
        body = req.context.json
        issued = cards.issue_card(req.context.user.id, body.account_id, body.type,
                                  body.cardholder_name, settings=self.settings,
                                  request_id=req.context.request_id, now=self.clock())
        resp.status = 201
        resp.location = f"{PREFIX}/{issued.card.id}"
        # The number must not outlive this response in any cache.
        resp.set_header("Cache-Control", "no-store")
        resp.media = dict(render_card(issued.card), number=issued.number)


class Card:
    """``/cards/{card_id}``: one of my cards (masked)."""

    @spec.validate(resp=_card_response(), security=BEARER, tags=TAGS)
    def on_get(self, req, resp, card_id):
        """Get one of my cards (masked number only)."""
        resp.media = render_card(cards.get_card(req.context.user.id, card_id))


class Freeze:
    @spec.validate(resp=_card_response(), security=BEARER, tags=TAGS)
    def on_post(self, req, resp, card_id):
        """Freeze the card: payments are refused until it is unfrozen."""
        resp.media = render_card(cards.freeze(req.context.user.id, card_id,
                                              request_id=req.context.request_id))


class Unfreeze:
    @spec.validate(resp=_card_response(), security=BEARER, tags=TAGS)
    def on_post(self, req, resp, card_id):
        """Unfreeze a frozen card (a cancelled card cannot be unfrozen)."""
        resp.media = render_card(cards.unfreeze(req.context.user.id, card_id,
                                                request_id=req.context.request_id))


class Cancel:
    @spec.validate(resp=_card_response(), security=BEARER, tags=TAGS)
    def on_post(self, req, resp, card_id):
        """Cancel the card for good: it can never pay, be unfrozen or be changed again."""
        resp.media = render_card(cards.cancel(req.context.user.id, card_id,
                                              request_id=req.context.request_id))


class Limits:
    @spec.validate(json=LimitsIn, resp=_card_response(), security=BEARER, tags=TAGS)
    def on_patch(self, req, resp, card_id):
        """Set the daily and/or monthly limit (monthly at least daily, both above zero)."""
        body = req.context.json
        card = cards.set_limits(req.context.user.id, card_id,
                                daily_limit=body.daily_limit,
                                monthly_limit=body.monthly_limit,
                                request_id=req.context.request_id)
        resp.media = render_card(card)


class Controls:
    @spec.validate(json=ControlsIn, resp=_card_response(), security=BEARER, tags=TAGS)
    def on_patch(self, req, resp, card_id):
        """Switch online, contactless and international payments on or off."""
        body = req.context.json
        card = cards.set_controls(
            req.context.user.id, card_id, online_enabled=body.online_enabled,
            contactless_enabled=body.contactless_enabled,
            international_enabled=body.international_enabled,
            request_id=req.context.request_id)
        resp.media = render_card(card)


class Payments:
    """``POST /cards/{card_id}/payments``: pay a merchant (Idempotency-Key honoured)."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(json=PaymentIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=PaymentOut, **_ERRORS), security=BEARER, tags=TAGS)
    def on_post(self, req, resp, card_id):
        """Pay with the card: one debit of its account carrying the card and merchant.

        Refused with a distinct 422 problem when the card is frozen or
        cancelled (``card-not-active``) or expired (``card-expired``), the
        channel or international use is off (``channel-disabled``), the
        daily or monthly limit would be exceeded (``daily-limit-exceeded``,
        ``monthly-limit-exceeded``) or funds are short (``insufficient-funds``).
        The new entry is at ``GET /transactions/{id}``.
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_payment(cards.pay(
            req.context.user.id, card_id, amount=body.amount, currency=body.currency,
            merchant_name=body.merchant_name, merchant_category=body.merchant_category,
            channel=body.channel, international=body.international,
            description=body.description, request_id=req.context.request_id,
            now=self.clock()), body.channel, body.international), TRANSACTIONS,
            kind="card_payment")


class Refunds:
    """``POST /cards/{card_id}/payments/{payment_id}/refunds`` (Idempotency-Key honoured)."""

    @spec.validate(json=RefundIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=RefundOut, **_ERRORS), security=BEARER, tags=TAGS)
    def on_post(self, req, resp, card_id, payment_id):
        """Refund part or all of a card payment back to the card's account.

        All refunds of a payment together cannot exceed it
        (``refund-exceeds-payment``).
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_refund(cards.refund(
            req.context.user.id, card_id, payment_id, amount=body.amount,
            request_id=req.context.request_id)), TRANSACTIONS, kind="card_refund")


def mount(app, settings, *, clock):
    """Add the card routes to ``app``; ``clock`` says when a payment happens."""
    card = f"{PREFIX}/{{card_id:uuid}}"
    app.add_route(PREFIX, Cards(settings, clock))
    app.add_route(card, Card())
    app.add_route(f"{card}/freeze", Freeze())
    app.add_route(f"{card}/unfreeze", Unfreeze())
    app.add_route(f"{card}/cancel", Cancel())
    app.add_route(f"{card}/limits", Limits())
    app.add_route(f"{card}/controls", Controls())
    app.add_route(f"{card}/payments", Payments(clock))
    app.add_route(f"{card}/payments/{{payment_id:uuid}}/refunds", Refunds())
