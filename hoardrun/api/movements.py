"""Money movement: deposits, withdrawals, transfers and P2P payments.

Every POST here moves money through ``hoardrun.ledger`` (via
``hoardrun.movements``, the domain module this one pairs with) and honours
an ``Idempotency-Key`` header (``hoardrun.api.idempotency``). Amounts are
decimal strings in the account's currency.

The GETs for transfers and P2P payments live here too, because they share
their collection URLs with the POSTs.
"""

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import cursors, history, movements
from ..models import MOVEMENT_STATUSES
from ..money import format_amount
from .history import CounterpartyOut, EntryOut, render_counterparty, render_entry
from .idempotency import IdempotencyHeaders, idempotent
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

API_PREFIX = "/api/v1"
TAGS = ["money"]

_AMOUNT = dict(min_length=1, max_length=40, examples=["12.34"],
               description="Decimal string in the account's currency, > 0 "
                           "(no exponent, no more places than the currency has)")


# --------------------------------------------------------------------------
# Schemas

class CashIn(BaseModel):
    """A deposit into, or a withdrawal from, one of my accounts."""

    model_config = ConfigDict(extra="forbid")

    amount: str = Field(**_AMOUNT)
    description: str | None = Field(None, max_length=movements.DESCRIPTION_MAX)


class TransferIn(BaseModel):
    """Move money between two of my accounts (same currency)."""

    model_config = ConfigDict(extra="forbid")

    from_account_id: uuid.UUID
    to_account_id: uuid.UUID
    amount: str = Field(**_AMOUNT)
    currency: str | None = Field(None, min_length=3, max_length=3,
                                 description="Optional; must be the accounts' currency")
    description: str | None = Field(None, max_length=movements.DESCRIPTION_MAX)


class P2PIn(BaseModel):
    """Pay another user into their primary account. Name them by exactly one of
    ``recipient_email``, ``recipient_user_id`` or ``recipient`` (an email or a user id)."""

    model_config = ConfigDict(extra="forbid")

    recipient_email: str | None = Field(None, max_length=254)
    recipient_user_id: uuid.UUID | None = None
    recipient: str | None = Field(None, max_length=254, description="An email or a user id")
    from_account_id: uuid.UUID | None = Field(None, description="Default: my primary account")
    amount: str = Field(**_AMOUNT)
    currency: str | None = Field(None, min_length=3, max_length=3,
                                 description="Optional; must be both accounts' currency")
    note: str | None = Field(None, max_length=movements.DESCRIPTION_MAX)


class MovementReversalOut(BaseModel):
    """The movement that undid a transfer or P2P payment (status ``reversed``)."""

    movement_id: uuid.UUID
    transaction_id: uuid.UUID = Field(description="The reversing entry on my account "
                                                  "(GET /transactions/{id})")
    reversed_at: datetime


class TransferOut(BaseModel):
    id: uuid.UUID
    reference: str
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID
    amount: str
    currency: str
    fee: str
    description: str | None
    status: Literal[MOVEMENT_STATUSES]
    created_at: datetime
    completed_at: datetime | None
    reversal: MovementReversalOut | None = Field(description="Set when status is reversed")


class TransferList(BaseModel):
    items: list[TransferOut]
    next_cursor: str | None


class P2POut(BaseModel):
    """A P2P payment seen from my side: only my own account id is shown."""

    id: uuid.UUID
    reference: str
    direction: Literal["sent", "received"]
    account_id: uuid.UUID = Field(description="My account on this payment")
    counterparty: CounterpartyOut
    amount: str
    currency: str
    note: str | None
    status: Literal[MOVEMENT_STATUSES]
    created_at: datetime
    completed_at: datetime | None
    reversal: MovementReversalOut | None = Field(description="Set when status is reversed")


class P2PList(BaseModel):
    items: list[P2POut]
    next_cursor: str | None


class TransferQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(cursors.DEFAULT_LIMIT, ge=1, le=cursors.MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)
    account_id: uuid.UUID | None = Field(None, description="Only transfers from or to it")
    status: Literal[MOVEMENT_STATUSES] | None = None


class P2PQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(cursors.DEFAULT_LIMIT, ge=1, le=cursors.MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)
    direction: Literal["sent", "received"] | None = None
    status: Literal[MOVEMENT_STATUSES] | None = None


class BatchLegIn(BaseModel):
    """One leg: from my account to my other account (``to_account_id``) or to another
    user's primary account (``recipient_email`` or ``recipient_user_id``): exactly one."""

    model_config = ConfigDict(extra="forbid")

    from_account_id: uuid.UUID
    to_account_id: uuid.UUID | None = None
    recipient_email: str | None = Field(None, max_length=254)
    recipient_user_id: uuid.UUID | None = None
    amount: str = Field(**_AMOUNT)
    description: str | None = Field(None, max_length=movements.DESCRIPTION_MAX,
                                    description="The transfer's description or the "
                                                "payment's note")


class BatchIn(BaseModel):
    """Up to 100 legs, made together or not at all."""

    model_config = ConfigDict(extra="forbid")

    legs: list[BatchLegIn] = Field(min_length=1, max_length=movements.BATCH_MAX_LEGS)


class BatchLegOut(BaseModel):
    index: int
    kind: Literal["transfer", "p2p"]
    id: uuid.UUID = Field(description="The transfer's or P2P payment's id (GET /transfers/{id} "
                                      "or /p2p/{id})")
    reference: str
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID | None = Field(description="Only for a transfer to my account")
    counterparty: CounterpartyOut | None = Field(description="Only for a payment to a user")
    amount: str
    currency: str
    description: str | None
    status: Literal["completed"]
    created_at: datetime


class BatchOut(BaseModel):
    id: uuid.UUID = Field(description="The batch (named in the audit log)")
    legs: list[BatchLegOut]


class LegProblem(BaseModel):
    """Why one leg of a refused batch cannot be made."""

    index: int = Field(description="The leg's position in the request, from 0")
    type: str = Field(examples=["https://hoardrun.dev/problems/insufficient-funds"])
    detail: str


class BatchProblem(Problem):
    """A refused batch: nothing moved; ``legs`` names every failing leg."""

    legs: list[LegProblem] | None = None


# --------------------------------------------------------------------------
# Rendering

def render_reversal(r):
    if r is None:
        return None
    return {"movement_id": r.movement_id, "transaction_id": r.entry_id,
            "reversed_at": r.reversed_at}


def render_transfer(t):
    return {"id": t.id, "reference": t.reference, "from_account_id": t.from_account_id,
            "to_account_id": t.to_account_id, "amount": format_amount(t.amount, t.currency),
            "currency": t.currency, "fee": format_amount(t.fee, t.currency),
            "description": t.description, "status": t.status, "created_at": t.created_at,
            "completed_at": t.completed_at, "reversal": render_reversal(t.reversal)}


def render_payment(p):
    return {"id": p.id, "reference": p.reference, "direction": p.direction,
            "account_id": p.account_id, "counterparty": render_counterparty(p.counterparty),
            "amount": format_amount(p.amount, p.currency), "currency": p.currency,
            "note": p.note, "status": p.status, "created_at": p.created_at,
            "completed_at": p.completed_at, "reversal": render_reversal(p.reversal)}


def render_batch(b):
    return {"id": b.id, "legs": [{
        "index": leg.index, "kind": leg.kind, "id": leg.id, "reference": leg.reference,
        "from_account_id": leg.from_account_id, "to_account_id": leg.to_account_id,
        "counterparty": None if leg.counterparty is None else render_counterparty(
            leg.counterparty),
        "amount": format_amount(leg.amount, leg.currency), "currency": leg.currency,
        "description": leg.description, "status": "completed", "created_at": leg.created_at,
    } for leg in b.legs]}


_POST_RESPONSES = dict(HTTP_401=Problem, HTTP_404=Problem, HTTP_422=Problem)
_GET_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem)


# --------------------------------------------------------------------------
# Resources

class Deposits:
    """``POST /accounts/{account_id}/deposits``."""

    @spec.validate(json=CashIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=EntryOut, **_POST_RESPONSES),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Deposit into one of my accounts (the sandbox's funding path).

        The response is the new entry on my account (as ``GET /transactions/{id}``).
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_entry(movements.deposit(
            req.context.user.id, account_id, body.amount, description=body.description,
            request_id=req.context.request_id)), f"{API_PREFIX}/transactions", kind="deposit")


class Withdrawals:
    """``POST /accounts/{account_id}/withdrawals``."""

    @spec.validate(json=CashIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=EntryOut, **_POST_RESPONSES),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Withdraw from one of my accounts, down to minus its overdraft limit at most."""
        body = req.context.json
        idempotent(req, resp, lambda: render_entry(movements.withdraw(
            req.context.user.id, account_id, body.amount, description=body.description,
            request_id=req.context.request_id)), f"{API_PREFIX}/transactions",
            kind="withdrawal")


class Transfers:
    """``/transfers``: my transfers; make one."""

    def __init__(self, settings):
        self.settings = settings

    @spec.validate(query=TransferQuery, resp=Response(HTTP_200=TransferList, HTTP_401=Problem,
                                                      HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """My transfers, newest first (cursor pagination)."""
        q = req.context.query
        page = history.transfers(req.context.user.id, secret=self.settings.secret_key,
                                 limit=q.limit, cursor=q.cursor, account_id=q.account_id,
                                 status=q.status)
        resp.media = {"items": [render_transfer(t) for t in page.items],
                      "next_cursor": page.next_cursor}

    @spec.validate(json=TransferIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=TransferOut, **_POST_RESPONSES),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Move money between two of my accounts in the same currency."""
        body = req.context.json
        idempotent(req, resp, lambda: render_transfer(movements.transfer(
            req.context.user.id, body.from_account_id, body.to_account_id, body.amount,
            currency=body.currency, description=body.description,
            request_id=req.context.request_id)), f"{API_PREFIX}/transfers", kind="transfer")


class Transfer:
    """``GET /transfers/{transfer_id}``."""

    @spec.validate(resp=Response(HTTP_200=TransferOut, **_GET_ERRORS), security=BEARER,
                   tags=TAGS)
    def on_get(self, req, resp, transfer_id):
        """One of my transfers."""
        resp.media = render_transfer(history.transfer(req.context.user.id, transfer_id))


def _recipient(body):
    """Split the request's recipient into ``(email, user_id)``; exactly one is set."""
    given = [v for v in (body.recipient_email, body.recipient_user_id, body.recipient)
             if v is not None]
    if len(given) != 1:
        return None, None  # movements.find_recipient says what is wrong
    if body.recipient is None:
        return body.recipient_email, body.recipient_user_id
    if "@" in body.recipient:
        return body.recipient, None
    return None, body.recipient


class P2PPayments:
    """``/p2p``: payments I sent or received; pay someone."""

    def __init__(self, settings):
        self.settings = settings

    @spec.validate(query=P2PQuery, resp=Response(HTTP_200=P2PList, HTTP_401=Problem,
                                                 HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """P2P payments I sent or received, newest first (cursor pagination)."""
        q = req.context.query
        page = history.payments(req.context.user.id, secret=self.settings.secret_key,
                                limit=q.limit, cursor=q.cursor, direction=q.direction,
                                status=q.status)
        resp.media = {"items": [render_payment(p) for p in page.items],
                      "next_cursor": page.next_cursor}

    @spec.validate(json=P2PIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=P2POut, HTTP_403=Problem, **_POST_RESPONSES),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Pay another user (by email or user id) into their primary account.

        Same currency only; paying yourself is refused (``same-account``).
        Both sides need a verified email: an unverified sender gets 403
        ``email-not-verified``; an unverified recipient is the same 404 as an
        unknown one.
        """
        body = req.context.json
        email, user_id = _recipient(body)
        idempotent(req, resp, lambda: render_payment(movements.p2p(
            req.context.user.id, body.amount, recipient_email=email,
            recipient_user_id=user_id, from_account_id=body.from_account_id,
            currency=body.currency, note=body.note, request_id=req.context.request_id)),
            f"{API_PREFIX}/p2p", kind="p2p")


class P2PPayment:
    """``GET /p2p/{payment_id}``."""

    @spec.validate(resp=Response(HTTP_200=P2POut, **_GET_ERRORS), security=BEARER, tags=TAGS)
    def on_get(self, req, resp, payment_id):
        """One P2P payment I sent or received."""
        resp.media = render_payment(history.payment(req.context.user.id, payment_id))


class Batches:
    """``POST /payments/batch``: many legs, all or none (Idempotency-Key honoured)."""

    @spec.validate(json=BatchIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=BatchOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_422=BatchProblem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Make up to 100 transfers and P2P payments at once: every leg or none.

        Each leg is from one of my accounts to another of mine or to another
        user (the P2P rules: verified recipients, their primary account, same
        currency). Legs are checked in order against running balances; when
        any leg cannot be made, nothing is, and the 422 ``batch-refused``
        lists each failing leg as ``legs: [{index, type, detail}]``. One
        ``Idempotency-Key`` covers the whole batch.
        """
        body = req.context.json
        legs = [movements.LegRequest(
            from_account_id=leg.from_account_id, amount=leg.amount,
            to_account_id=leg.to_account_id, recipient_email=leg.recipient_email,
            recipient_user_id=leg.recipient_user_id, description=leg.description)
            for leg in body.legs]
        idempotent(req, resp, lambda: render_batch(movements.batch(
            req.context.user.id, legs, request_id=req.context.request_id)), None, kind="batch")


def mount(app, settings):
    """Add the money-movement routes to ``app``."""
    accounts = f"{API_PREFIX}/accounts/{{account_id:uuid}}"
    app.add_route(f"{accounts}/deposits", Deposits())
    app.add_route(f"{accounts}/withdrawals", Withdrawals())
    app.add_route(f"{API_PREFIX}/transfers", Transfers(settings))
    app.add_route(f"{API_PREFIX}/transfers/{{transfer_id:uuid}}", Transfer())
    app.add_route(f"{API_PREFIX}/p2p", P2PPayments(settings))
    app.add_route(f"{API_PREFIX}/p2p/{{payment_id:uuid}}", P2PPayment())
    app.add_route(f"{API_PREFIX}/payments/batch", Batches())
