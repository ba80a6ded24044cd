"""History: an account's entries, one entry, and an account statement.

Lists are newest first with an opaque, signed ``cursor`` (``next_cursor`` of
the previous page) and ``limit`` ≤ 100. Filters: ``type``, ``direction``,
``status``, ``from``/``to`` (ISO 8601; without an offset they are read as
UTC; ``from`` inclusive, ``to`` exclusive), ``min_amount``/``max_amount``
(decimal strings in the account's currency), ``merchant_category`` and
``q`` (text in the description, case-insensitive). A cursor is only valid
with the filters it was made with. Queries live in ``hoardrun.history``.
"""

import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from spectree import Response

from .. import cursors, history
from ..auth import utcnow
from ..models import DIRECTIONS, ENTRY_STATUSES, ENTRY_TYPES
from ..money import format_amount
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

API_PREFIX = "/api/v1"
TAGS = ["history"]


class CounterpartyOut(BaseModel):
    """The other side: one of my accounts, another user (name only), or outside HoardRun."""

    kind: Literal["account", "user", "external"]
    account_id: uuid.UUID | None = Field(None, description="Only for my own accounts")
    user_id: uuid.UUID | None = None
    name: str | None = None


class EntryOut(BaseModel):
    """One ledger entry on one of my accounts; amounts are decimal strings."""

    id: uuid.UUID
    account_id: uuid.UUID
    movement_id: uuid.UUID = Field(description="Shared by the entries of one movement")
    type: Literal[ENTRY_TYPES]
    direction: Literal[DIRECTIONS]
    amount: str
    currency: str
    balance_after: str
    description: str | None
    merchant_name: str | None
    merchant_category: str | None
    reference: str
    status: Literal[ENTRY_STATUSES]
    created_at: datetime
    transfer_id: uuid.UUID | None
    p2p_id: uuid.UUID | None
    reverses_id: uuid.UUID | None
    counterparty: CounterpartyOut | None


class EntryList(BaseModel):
    items: list[EntryOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at "
                                                "the end")


def _as_utc(value):
    # Read without an offset as UTC (documented); a valid ISO 8601 time whose
    # offset pushes it past year 1 or 9999 (0001-01-01T00:00+01:00) cannot
    # be a UTC datetime: refuse it here (422 naming the field), not as an
    # OverflowError deep in the query.
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class EntryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    limit: int = Field(cursors.DEFAULT_LIMIT, ge=1, le=cursors.MAX_LIMIT)
    cursor: str | None = Field(None, max_length=1000)
    type: Literal[ENTRY_TYPES] | None = None
    direction: Literal[DIRECTIONS] | None = None
    status: Literal[ENTRY_STATUSES] | None = None
    from_: UTCDateTime | None = Field(None, alias="from", description="Inclusive, ISO 8601")
    to: UTCDateTime | None = Field(None, description="Exclusive, ISO 8601")
    min_amount: str | None = Field(None, max_length=40, examples=["10.00"])
    max_amount: str | None = Field(None, max_length=40, examples=["250.00"])
    merchant_category: str | None = Field(None, max_length=64)
    q: str | None = Field(None, min_length=1, max_length=history.Q_MAX_LENGTH,
                          description="Text in the description (case-insensitive)")


class StatementQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: UTCDateTime | None = Field(None, alias="from",
                                      description="Inclusive; default: the start of to's month")
    to: UTCDateTime | None = Field(None, description="Exclusive; default: now")


class TypeTotalOut(BaseModel):
    type: Literal[ENTRY_TYPES]
    direction: Literal[DIRECTIONS]
    count: int
    amount: str


class StatementOut(BaseModel):
    """An account over ``[from, to)``: closing = opening + total_in - total_out."""

    account_id: uuid.UUID
    currency: str
    from_: datetime = Field(alias="from")
    to: datetime
    opening_balance: str
    total_in: str
    total_out: str
    closing_balance: str
    entry_count: int
    totals_by_type: list[TypeTotalOut]


def render_counterparty(cp):
    if cp is None:
        return None
    return {"kind": cp.kind, "account_id": cp.account_id, "user_id": cp.user_id,
            "name": cp.name}


def render_entry(e):
    """A ``history.Entry`` as the ``EntryOut`` dict."""
    return {"id": e.id, "account_id": e.account_id, "movement_id": e.movement_id,
            "type": e.type, "direction": e.direction,
            "amount": format_amount(e.amount, e.currency), "currency": e.currency,
            "balance_after": format_amount(e.balance_after, e.currency),
            "description": e.description, "merchant_name": e.merchant_name,
            "merchant_category": e.merchant_category, "reference": e.reference,
            "status": e.status, "created_at": e.created_at, "transfer_id": e.transfer_id,
            "p2p_id": e.p2p_id, "reverses_id": e.reverses_id,
            "counterparty": render_counterparty(e.counterparty)}


def render_statement(s):
    money = lambda minor: format_amount(minor, s.currency)  # noqa: E731
    return {"account_id": s.account_id, "currency": s.currency, "from": s.start, "to": s.end,
            "opening_balance": money(s.opening_balance), "total_in": money(s.total_in),
            "total_out": money(s.total_out), "closing_balance": money(s.closing_balance),
            "entry_count": s.entry_count,
            "totals_by_type": [{"type": t.type, "direction": t.direction, "count": t.count,
                                "amount": money(t.amount)} for t in s.by_type]}


_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem)


class AccountTransactions:
    """``GET /accounts/{account_id}/transactions``."""

    def __init__(self, settings):
        self.settings = settings

    @spec.validate(query=EntryQuery,
                   resp=Response(HTTP_200=EntryList, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp, account_id):
        """The entries on one of my accounts, newest first, filtered and paginated."""
        q = req.context.query
        page = history.account_entries(
            req.context.user.id, account_id, secret=self.settings.secret_key, limit=q.limit,
            cursor=q.cursor, type=q.type, direction=q.direction, status=q.status,
            start=q.from_, end=q.to, min_amount=q.min_amount, max_amount=q.max_amount,
            merchant_category=q.merchant_category, q=q.q)
        resp.media = {"items": [render_entry(e) for e in page.items],
                      "next_cursor": page.next_cursor}


class Statement:
    """``GET /accounts/{account_id}/statement``."""

    def __init__(self, *, clock=utcnow):
        self.clock = clock

    @spec.validate(query=StatementQuery,
                   resp=Response(HTTP_200=StatementOut, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp, account_id):
        """Opening balance, totals in and out by type, closing balance and entry count.

        Computed in SQL over the same entries the list shows for the same
        ``from``/``to``.
        """
        q = req.context.query
        end = q.to or self.clock()
        start = q.from_
        if start is None:
            month = (end if end.tzinfo else end.replace(tzinfo=timezone.utc)).astimezone(
                timezone.utc)
            start = month.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        resp.media = render_statement(history.statement(req.context.user.id, account_id,
                                                        start=start, end=end))


class BalanceQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: UTCDateTime = Field(description="ISO 8601 instant (read as UTC without an offset); "
                                           "not after now")


class BalanceOut(BaseModel):
    """An account at one instant, from the balance its last entry then left."""

    account_id: uuid.UUID
    currency: str
    as_of: datetime
    balance: str
    pending_holds: str = Field(description="What card authorizations active then reserved")
    available_balance: str = Field(description="balance - pending_holds")
    entry_id: uuid.UUID | None = Field(description="The last entry at or before as_of (null "
                                                   "before the first)")
    entry_created_at: datetime | None


class Balance:
    """``GET /accounts/{account_id}/balance?as_of=``."""

    def __init__(self, *, clock=utcnow):
        self.clock = clock

    @spec.validate(query=BalanceQuery,
                   resp=Response(HTTP_200=BalanceOut, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp, account_id):
        """My account's balance and available balance as of an instant.

        Read from the ``balance_after`` of the last entry at or before
        ``as_of`` (one index seek, never a sum); zero before the first entry.
        An instant after now is a 422.
        """
        b = history.balance_at(req.context.user.id, account_id, req.context.query.as_of,
                               now=self.clock())
        resp.media = {"account_id": b.account_id, "currency": b.currency, "as_of": b.as_of,
                      "balance": format_amount(b.balance, b.currency),
                      "pending_holds": format_amount(b.held, b.currency),
                      "available_balance": format_amount(b.balance - b.held, b.currency),
                      "entry_id": b.entry_id, "entry_created_at": b.entry_at}


class Transaction:
    """``GET /transactions/{transaction_id}``."""

    @spec.validate(resp=Response(HTTP_200=EntryOut, **_ERRORS), security=BEARER, tags=TAGS)
    @replica_reads
    def on_get(self, req, resp, transaction_id):
        """One entry on one of my accounts."""
        resp.media = render_entry(history.entry(req.context.user.id, transaction_id))


def mount(app, settings, *, clock=utcnow):
    """Add the history routes to ``app``."""
    account = f"{API_PREFIX}/accounts/{{account_id:uuid}}"
    app.add_route(f"{account}/transactions", AccountTransactions(settings))
    app.add_route(f"{account}/statement", Statement(clock=clock))
    app.add_route(f"{account}/balance", Balance(clock=clock))
    app.add_route(f"{API_PREFIX}/transactions/{{transaction_id:uuid}}", Transaction())
