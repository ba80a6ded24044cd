"""Investment holdings, the sandbox price list and buy/sell orders.

Orders go through ``ledger.buy`` / ``ledger.sell``: the cash leg (quantity ×
price, rounded to the minor unit in the house's favour: a buy UP, a sell
DOWN, so no round trip of orders can farm the rounding) and the holding
change land in one database transaction, together with the audit row
written here.

Valuation: a holding's current value is quantity × current price rounded
DOWN to the minor unit, i.e. what selling it now would pay (the sell rule),
computed by one SQL expression that both the holdings list and the portfolio
summary use, so the summary always equals the sum of the holdings it shows.
Unrealised gain is current value minus cost basis (what was paid for the
quantity still held, average-cost method).

Values are computed by PostgreSQL exactly (NUMERIC), never through floats.
"""

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from . import audit, errors, ledger
from .db import db
from .ids import parse_id
from .ledger import QUANTITY_PLACES
from .models import INVESTMENT_TYPES, InstrumentPrice, Investment
from .money import format_amount, get_currency
from .text import clean_text

SIDES = ("buy", "sell")
_SYMBOL = re.compile(r"[A-Z0-9][A-Z0-9.\-]{0,11}")
_PLACES = Decimal(10) ** -QUANTITY_PLACES

#: The sandbox price list ``invoke db.sample`` loads (symbol, name, type, currency, price).
DEFAULT_PRICES = (
    ("AAPL", "Apple Inc.", "stock", "USD", "190.00"),
    ("MSFT", "Microsoft Corporation", "stock", "USD", "420.00"),
    ("VTI", "Vanguard Total Stock Market ETF", "etf", "USD", "260.00"),
    ("BTC", "Bitcoin", "crypto", "USD", "65000.00"),
)


# --------------------------------------------------------------------------
# Input

def normalise_symbol(value):
    """Upper-case ``value`` and check it is a ticker: 1 to 12 of A-Z, 0-9, '.', '-'."""
    symbol = value.strip().upper() if isinstance(value, str) else ""
    if not _SYMBOL.fullmatch(symbol):
        raise errors.ValidationError("symbol must be 1 to 12 letters, digits, dots or hyphens",
                                     field="symbol")
    return symbol


# --------------------------------------------------------------------------
# Price list

def list_prices():
    """Every instrument on the price list, by symbol."""
    return list(InstrumentPrice.select().order_by(InstrumentPrice.symbol))


def set_price(symbol, price, *, name=None, type=None, currency=None, actor_id=None,
              request_id=None):
    """Create or update ``symbol``'s price (a Decimal or decimal string); audited.

    A new symbol needs ``name``, ``type`` and ``currency``; an existing one
    keeps its type and currency (holdings and orders are in that currency).
    Every holding of the symbol is revalued in the same transaction.
    """
    symbol = normalise_symbol(symbol)
    price = ledger.parse_quantity(price, "price")
    if type is not None and type not in INVESTMENT_TYPES:
        raise errors.ValidationError(f"type must be one of {', '.join(INVESTMENT_TYPES)}",
                                     field="type")
    if currency is not None:
        get_currency(currency)
    if name is not None:
        name = clean_text(name, "name", max_length=200, required=True)
    with db.atomic():
        existing = InstrumentPrice.get_or_none(InstrumentPrice.symbol == symbol)
        before = None if existing is None else price_state(existing)
        if existing is not None:
            for field, given, current in (("currency", currency, existing.currency),
                                          ("type", type, existing.type)):
                if given is not None and given != current:
                    raise errors.ValidationError(
                        f"{symbol} is listed as {current}; its {field} cannot change",
                        field=field)
        row = ledger.set_price(symbol, price, name=name, type=type, currency=currency)
        audit.record("price.set", "instrument_price", symbol, actor_id=actor_id, before=before,
                     after=price_state(row), request_id=request_id)
    return row, existing is None


def price_state(row):
    """A price-list row as the API and the audit log show it."""
    return {"symbol": row.symbol, "name": row.name, "type": row.type,
            "currency": row.currency, "price": _places(row.price),
            "updated_at": row.updated_at}


def load_default_prices():
    """Put the symbols of ``DEFAULT_PRICES`` that are missing on the price list.

    Listed symbols keep their (perhaps admin-set) price, so a second run
    changes nothing. Returns the symbols added.
    """
    added = []
    for symbol, name, kind, currency, price in DEFAULT_PRICES:
        if InstrumentPrice.get_or_none(InstrumentPrice.symbol == symbol) is None:
            with db.atomic():
                row = ledger.set_price(symbol, Decimal(price), name=name, type=kind,
                                       currency=currency)
                audit.record("price.set", "instrument_price", symbol, after=price_state(row))
            added.append(symbol)
    return added


# --------------------------------------------------------------------------
# Holdings and the portfolio

def _value_sql(alias="i"):
    """SQL for a holding's current value in minor units: what a sale would pay now."""
    # Functions from migrations 003/004: the same rule as a sell's cash leg.
    return (f"hoardrun_minor_floor({alias}.quantity * {alias}.current_price, "
            f"hoardrun_currency_exponent({alias}.currency))")


_HOLDING_COLUMNS = ("id", "account_id", "symbol", "name", "type", "currency", "quantity",
                    "cost_basis", "current_price", "purchase_date", "updated_at")


@dataclass(frozen=True)
class Holding:
    """One holding, valued at the current price (money in minor units)."""

    id: uuid.UUID
    account_id: uuid.UUID
    symbol: str
    name: str
    type: str
    currency: str
    quantity: Decimal
    cost_basis: int
    current_price: Decimal
    purchase_date: datetime
    updated_at: datetime
    current_value: int

    @property
    def unrealised_gain(self):
        """Current value minus what was paid for the quantity held (minor units)."""
        return self.current_value - self.cost_basis

    @property
    def average_cost(self):
        """Average price paid per unit held, in major units (8 places)."""
        cost = Decimal(self.cost_basis) / get_currency(self.currency).factor
        return _places(cost / self.quantity)


def _holdings(where, params):
    columns = ", ".join(f"i.{c}" for c in _HOLDING_COLUMNS)
    sql = (f"SELECT {columns}, {_value_sql()} AS current_value FROM investments i "
           f"WHERE i.user_id = %s AND i.quantity > 0 {where} "
           "ORDER BY i.symbol, i.account_id")
    rows = db.execute_sql(sql, params).fetchall()
    return [_holding(row) for row in rows]


def _holding(row):
    (hid, account_id, symbol, name, kind, currency, quantity, cost_basis, price, purchased,
     updated, value) = row
    return Holding(
        id=_as_uuid(hid), account_id=_as_uuid(account_id), symbol=symbol, name=name, type=kind,
        currency=currency, quantity=_places(quantity), cost_basis=int(cost_basis),
        current_price=_places(price),
        purchase_date=Investment.purchase_date.python_value(purchased),
        updated_at=Investment.updated_at.python_value(updated), current_value=int(value))


def list_holdings(user_id):
    """``user_id``'s holdings with a quantity above zero, by symbol."""
    return _holdings("", (_db_uuid(user_id),))


def get_holding(user_id, holding_id):
    """One of ``user_id``'s holdings; NotFound for an unknown or someone else's holding."""
    found = _holdings("AND i.id = %s",
                      (_db_uuid(user_id), _db_uuid(holding_id, "holding")))
    if not found:
        raise errors.NotFound("holding not found")
    return found[0]


@dataclass(frozen=True)
class CurrencyTotals:
    """The portfolio in one currency (minor units)."""

    currency: str
    holdings: int
    cost_basis: int
    current_value: int
    cash: int

    @property
    def unrealised_gain(self):
        return self.current_value - self.cost_basis


def portfolio_summary(user_id):
    """Per currency: holdings count, cost basis, current value and investment cash.

    Aggregated by the database in one statement (GROUP BY currency), with
    the same valuation expression as the holdings list.
    """
    sql = (
        "SELECT currency, SUM(holdings), SUM(cost_basis), SUM(current_value), SUM(cash) "
        "FROM ("
        "  SELECT i.currency AS currency, 1 AS holdings, i.cost_basis AS cost_basis, "
        f"         {_value_sql()} AS current_value, 0 AS cash "
        "    FROM investments i WHERE i.user_id = %s AND i.quantity > 0 "
        "  UNION ALL "
        "  SELECT a.currency, 0, 0, 0, a.balance "
        "    FROM accounts a WHERE a.user_id = %s AND a.type = 'investment' "
        "     AND a.status <> 'closed'"
        ") parts GROUP BY currency ORDER BY currency")
    user = _db_uuid(user_id)
    return [CurrencyTotals(currency, int(count), int(cost), int(value), int(cash))
            for currency, count, cost, value, cash in db.execute_sql(sql, (user, user))]


# --------------------------------------------------------------------------
# Orders

@dataclass(frozen=True)
class Order:
    """An executed order (money in minor units).

    ``id`` is the order's entry on the investment account (so the order is
    also ``GET /transactions/{id}``); ``movement_id`` groups its two entries.
    """

    id: uuid.UUID
    movement_id: uuid.UUID
    account_id: uuid.UUID
    holding_id: uuid.UUID
    symbol: str
    side: str
    quantity: Decimal
    price: Decimal
    amount: int
    currency: str
    held_quantity: Decimal
    cost_basis: int
    balance_after: int
    executed_at: datetime


def place_order(user_id, account_id, symbol, side, quantity, *, request_id=None):
    """Buy or sell ``quantity`` (decimal string or Decimal) of ``symbol`` at the current price.

    Cash moves from/to the investment account ``account_id`` through the
    ledger in the same transaction as the holding and the audit row.
    Selling more than is held is InsufficientHolding (422).
    """
    if side not in SIDES:
        raise errors.ValidationError("side must be buy or sell", field="side")
    symbol = normalise_symbol(symbol)
    quantity = ledger.parse_quantity(quantity, "quantity")
    user_id = _as_uuid(user_id)
    with db.atomic():
        trade = (ledger.buy if side == "buy" else ledger.sell)(user_id, account_id, symbol,
                                                               quantity)
        posting = trade.posting
        # Buying debits the customer's account; selling credits it.
        leg = posting.debit if side == "buy" else posting.credit
        order = Order(
            id=leg.entry_id, movement_id=posting.movement_id, account_id=leg.account_id,
            holding_id=trade.holding_id,
            symbol=trade.symbol, side=side, quantity=_places(trade.quantity),
            price=_places(trade.price), amount=trade.cash, currency=posting.currency,
            held_quantity=_places(trade.held_quantity), cost_basis=trade.cost_basis,
            balance_after=leg.balance_after, executed_at=posting.posted_at)
        audit.record(f"investment.{side}", "investment", trade.holding_id, actor_id=user_id,
                     after={"entry_id": order.id, "movement_id": order.movement_id,
                            "account_id": order.account_id,
                            "symbol": symbol, "quantity": format(order.quantity, "f"),
                            "price": format(order.price, "f"), "amount": order.amount,
                            "currency": order.currency,
                            "held_quantity": format(order.held_quantity, "f"),
                            "cost_basis": order.cost_basis},
                     request_id=request_id)
    return order


def money(minor, currency):
    """Minor units as the currency's decimal string (re-exported for the API layer)."""
    return format_amount(minor, currency)


def _places(value):
    """``value`` as a Decimal with exactly 8 places (stable text in responses)."""
    return Decimal(str(value)).quantize(_PLACES)


def _as_uuid(value, field=None):
    return parse_id(value, field or "holding")


def _db_uuid(value, field=None):
    """A UUID as a raw-SQL parameter."""
    return str(_as_uuid(value, field))
