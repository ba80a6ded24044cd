"""``/api/v1/investments``: my holdings, the portfolio summary and buy/sell orders.

Money is a decimal string in the holding's currency; quantities and prices
are decimal strings with 8 places. Another user's holding answers 404.
"""

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import investments
from ..money import format_amount
from .idempotency import IdempotencyHeaders, idempotent
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

TAGS = ["investments"]
PREFIX = "/api/v1/investments"
TRANSACTIONS = "/api/v1/transactions"


class HoldingOut(BaseModel):
    """One holding valued at the current price (average-cost basis)."""

    id: UUID
    account_id: UUID
    symbol: str
    name: str
    type: str
    currency: str
    quantity: str = Field(examples=["1.50000000"])
    average_cost: str = Field(description="Average price paid per unit (8 places)")
    cost_basis: str = Field(description="What the quantity held cost in total")
    current_price: str
    current_value: str = Field(description="quantity × current price, rounded down "
                                           "(what selling it now would pay)")
    unrealised_gain: str = Field(description="current_value − cost_basis (may be negative)")
    unrealised_gain_percent: str | None = Field(
        description="unrealised_gain / cost_basis × 100, 2 places; null when cost is zero")
    purchase_date: datetime
    updated_at: datetime


class HoldingList(BaseModel):
    items: list[HoldingOut]


class CurrencySummary(BaseModel):
    """The portfolio in one currency."""

    currency: str
    holdings: int
    cost_basis: str
    current_value: str
    unrealised_gain: str
    unrealised_gain_percent: str | None
    cash: str = Field(description="Cash in my investment accounts in this currency")
    total_value: str = Field(description="current_value + cash")


class PortfolioSummary(BaseModel):
    currencies: list[CurrencySummary]


class OrderIn(BaseModel):
    """Buy or sell at the current price; cash moves from/to the investment account."""

    model_config = ConfigDict(extra="forbid")

    account_id: UUID
    symbol: str = Field(min_length=1, max_length=12, examples=["AAPL"])
    side: Literal["buy", "sell"]
    quantity: str = Field(pattern=r"^[0-9]{1,16}(\.[0-9]{1,8})?$", examples=["0.5"],
                          description="Decimal string > 0, at most 8 decimal places")


class OrderOut(BaseModel):
    id: UUID = Field(description="The order's entry on the investment account "
                                 "(GET /transactions/{id})")
    movement_id: UUID
    account_id: UUID
    holding_id: UUID
    symbol: str
    side: Literal["buy", "sell"]
    quantity: str
    price: str
    amount: str = Field(description="Cash moved: quantity × price rounded in the "
                                   "house's favour (a buy up, a sell down)")
    currency: str
    held_quantity: str = Field(description="Quantity held after the order")
    cost_basis: str = Field(description="Cost basis of the holding after the order")
    balance_after: str = Field(description="Investment account balance after the order")
    status: Literal["completed"]
    executed_at: datetime


def _plain(value):
    """A Decimal as plain digits: ``0.00000000``, never ``0E-8``."""
    return format(value, "f")


def _percent(gain, cost):
    if cost == 0:
        return None
    return _plain((Decimal(gain) * 100 / Decimal(cost)).quantize(Decimal("0.01"),
                                                                 rounding=ROUND_HALF_EVEN))


def render_holding(h):
    money = lambda minor: format_amount(minor, h.currency)  # noqa: E731
    return {"id": h.id, "account_id": h.account_id, "symbol": h.symbol, "name": h.name,
            "type": h.type, "currency": h.currency, "quantity": _plain(h.quantity),
            "average_cost": _plain(h.average_cost), "cost_basis": money(h.cost_basis),
            "current_price": _plain(h.current_price), "current_value": money(h.current_value),
            "unrealised_gain": money(h.unrealised_gain),
            "unrealised_gain_percent": _percent(h.unrealised_gain, h.cost_basis),
            "purchase_date": h.purchase_date, "updated_at": h.updated_at}


def render_totals(t):
    money = lambda minor: format_amount(minor, t.currency)  # noqa: E731
    return {"currency": t.currency, "holdings": t.holdings, "cost_basis": money(t.cost_basis),
            "current_value": money(t.current_value), "unrealised_gain": money(t.unrealised_gain),
            "unrealised_gain_percent": _percent(t.unrealised_gain, t.cost_basis),
            "cash": money(t.cash), "total_value": money(t.current_value + t.cash)}


def render_order(o):
    money = lambda minor: format_amount(minor, o.currency)  # noqa: E731
    return {"id": o.id, "movement_id": o.movement_id, "account_id": o.account_id,
            "holding_id": o.holding_id,
            "symbol": o.symbol, "side": o.side, "quantity": _plain(o.quantity),
            "price": _plain(o.price), "amount": money(o.amount), "currency": o.currency,
            "held_quantity": _plain(o.held_quantity), "cost_basis": money(o.cost_basis),
            "balance_after": money(o.balance_after), "status": "completed",
            "executed_at": o.executed_at}


_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem, HTTP_422=Problem)


class Holdings:
    """``/investments``: my holdings."""

    @spec.validate(resp=Response(HTTP_200=HoldingList, HTTP_401=Problem), security=BEARER,
                   tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """List my holdings (quantity above zero), by symbol, valued at current prices."""
        resp.media = {"items": [render_holding(h)
                                for h in investments.list_holdings(req.context.user.id)]}


class Holding:
    """``/investments/{holding_id}``: one of my holdings."""

    @spec.validate(resp=Response(HTTP_200=HoldingOut, HTTP_401=Problem, HTTP_404=Problem),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp, holding_id):
        """Get one of my holdings."""
        resp.media = render_holding(investments.get_holding(req.context.user.id, holding_id))


class Summary:
    """``/investments/summary``: the portfolio, per currency."""

    @spec.validate(resp=Response(HTTP_200=PortfolioSummary, HTTP_401=Problem),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp):
        """My portfolio per currency: cost, value, unrealised gain and investment cash.

        Aggregated by the database; equals the sum of ``GET /investments``.
        """
        resp.media = {"currencies": [render_totals(t) for t in
                                     investments.portfolio_summary(req.context.user.id)]}


class Orders:
    """``POST /investments/orders``: buy or sell (Idempotency-Key honoured)."""

    @spec.validate(json=OrderIn, headers=IdempotencyHeaders,
                   resp=Response(HTTP_201=OrderOut, **_ERRORS), security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Buy or sell a quantity at the current price from/into my investment account.

        The cash (quantity × price to the minor unit, rounded in the house's
        favour: a buy up, a sell down, so no round trip of orders makes money
        from rounding) and the holding change land in one transaction. Cash
        above the largest amount (10^15 minor units) is ``invalid-amount``; a
        sell worth less than one minor unit is ``order-too-small``. Selling more than I
        hold is ``insufficient-holding``; a non-investment account is
        ``not-investment-account``; short cash is ``insufficient-funds``.
        """
        body = req.context.json
        idempotent(req, resp, lambda: render_order(investments.place_order(
            req.context.user.id, body.account_id, body.symbol, body.side, body.quantity,
            request_id=req.context.request_id)), TRANSACTIONS, kind="trade")


def mount(app, settings):
    """Add the investment routes to ``app``."""
    app.add_route(PREFIX, Holdings())
    app.add_route(f"{PREFIX}/summary", Summary())
    app.add_route(f"{PREFIX}/orders", Orders())
    app.add_route(f"{PREFIX}/{{holding_id:uuid}}", Holding())
