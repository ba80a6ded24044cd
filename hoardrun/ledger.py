"""Every money movement goes through here, in one database transaction.

Each movement posts exactly two immutable entries (double entry) that share
a ``movement_id``: the account debited gets an outbound entry, the account
credited an inbound one, each with the balance it left behind. Deposits and
withdrawals post against one of the currency's settlement accounts (its
settlement buckets, one chosen per movement so that concurrent movements do
not queue on one row: migration 009), so every currency sums to zero over
all accounts.

The rules are written once, as reviewed PL/pgSQL functions installed by
the migrations (002, 003, …): each movement is one call that locks the
accounts FOR UPDATE in id order, checks the rules under the lock and writes
everything: one round trip, one implicit transaction. This module validates
the arguments, calls the function and turns its SQLSTATEs into domain errors.
"""

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import peewee as pw

from . import errors
from .clock import utcnow
from .db import db, driver_error, to_utc
from .ids import as_uuid, parse_id
from .models import CARD_CHANNELS, INVESTMENT_TYPES, InstrumentPrice, Investment
from .money import MAX_MINOR_UNITS, get_currency

#: Investment quantities carry at most this many decimal places (NUMERIC(24, 8)).
QUANTITY_PLACES = 8
_QUANTITY = re.compile(rf"[0-9]{{1,16}}(\.[0-9]{{1,{QUANTITY_PLACES}}})?")

# SQLSTATEs raised by the ledger functions, mapped to the domain errors.
_PG_ERRORS = {
    "HR001": errors.InsufficientFunds,
    "HR002": errors.AccountNotActive,
    "HR003": errors.CurrencyMismatch,
    "HR004": errors.SameAccount,
    "HR005": errors.ReversalNotAllowed,
    "HR010": errors.CardNotActive,
    "HR011": errors.CardExpired,
    "HR012": errors.ChannelDisabled,
    "HR013": errors.DailyLimitExceeded,
    "HR014": errors.MonthlyLimitExceeded,
    "HR015": errors.RefundExceedsPayment,
    "HR016": errors.InsufficientHolding,
    "HR017": errors.NotInvestmentAccount,
    "HR018": errors.OrderTooSmall,
    "HR019": errors.PaymentReversed,
    # An amount above MAX_MINOR_UNITS, e.g. a trade's computed cash leg.
    "HR020": errors.AmountError,
    "HR031": errors.AuthorizationResolved,
    "HR032": errors.AuthorizationExpired,
    "HR033": errors.CaptureExceedsAuthorization,
    "HR404": errors.NotFound,
}

#: A card authorization lasts this long unless it asks for less (or more, up to the maximum).
HOLD_DEFAULT_EXPIRY = timedelta(days=7)
HOLD_MAX_EXPIRY = timedelta(days=30)
#: A batch moves at most this many legs in one call.
BATCH_MAX_LEGS = 100
#: The expiry sweep records at most this many holds per transaction.
EXPIRE_BATCH = 1000


@dataclass(frozen=True)
class Leg:
    """One side of a posting: the account, its new entry and its balance after."""

    account_id: uuid.UUID
    entry_id: uuid.UUID
    balance_after: int


@dataclass(frozen=True)
class Posting:
    """What one money movement wrote."""

    movement_id: uuid.UUID
    currency: str
    amount: int
    debit: Leg
    credit: Leg
    posted_at: datetime


@dataclass(frozen=True)
class Trade:
    """What one buy or sell wrote: the cash posting and the holding after it."""

    posting: Posting
    holding_id: uuid.UUID
    symbol: str
    quantity: Decimal
    price: Decimal
    cash: int
    held_quantity: Decimal
    cost_basis: int


@dataclass(frozen=True)
class Hold:
    """A card authorization as stored (amounts in minor units; times on the app's clock)."""

    id: uuid.UUID
    user_id: uuid.UUID
    card_id: uuid.UUID
    account_id: uuid.UUID
    amount: int
    currency: str
    status: str
    captured_amount: int | None
    capture_movement_id: uuid.UUID | None
    merchant_name: str
    merchant_category: str
    channel: str
    international: bool
    description: str | None
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None


#: card_holds' columns in Hold's field order: every hold read selects these.
HOLD_COLUMNS = ("id", "user_id", "card_id", "account_id", "amount", "currency", "status",
                "captured_amount", "capture_movement_id", "merchant_name", "merchant_category",
                "channel", "international", "description", "created_at", "expires_at",
                "resolved_at")


def hold_from_row(row):
    """A ``Hold`` from the HOLD_COLUMNS of one row."""
    (hold_id, user_id, card_id, account_id, amount, currency, status, captured,
     movement, merchant_name, merchant_category, channel, international, description,
     created_at, expires_at, resolved_at) = row
    return Hold(as_uuid(hold_id), as_uuid(user_id), as_uuid(card_id),
                as_uuid(account_id), int(amount), currency, status,
                None if captured is None else int(captured),
                None if movement is None else as_uuid(movement), merchant_name,
                merchant_category, channel, bool(international), description,
                to_utc(created_at), to_utc(expires_at), to_utc(resolved_at))


@dataclass(frozen=True)
class BatchLeg:
    """One leg of a batch: a transfer between my accounts, or a P2P payment (``p2p``)."""

    id: uuid.UUID
    p2p: bool
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID
    amount: int
    reference: str
    text: str | None


def new_reference(prefix, ident):
    """A unique, human-quotable reference derived from a movement's id."""
    return f"{prefix}-{ident.hex.upper()}"


def entry_reference(entry_id):
    """The reference the ledger functions give entry ``entry_id`` ('E' and its hex)."""
    return "E" + entry_id.hex


def _check_amount(amount):
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise errors.AmountError("amount must be an integer number of minor units",
                                 field="amount")
    if amount <= 0:
        raise errors.AmountError("amount must be greater than zero", field="amount")
    if amount > MAX_MINOR_UNITS:
        raise errors.AmountError("amount is too large", field="amount")


def _uuid(value, field):
    return parse_id(value, field, field=field)


# --------------------------------------------------------------------------
# Public operations
# --------------------------------------------------------------------------

def deposit(account_id, amount, *, user_id=None, currency=None, description=None):
    """Credit ``account_id`` with ``amount`` from the outside world.

    ``user_id``, when given, must own the account (else NotFound); ``currency``,
    when given, must be the account's.
    """
    _check_amount(amount)
    return _LEDGER.cash(uuid.uuid4(), _opt_uuid(user_id), _uuid(account_id, "account_id"),
                           amount, currency, True, description)


def withdraw(account_id, amount, *, user_id=None, currency=None, description=None):
    """Debit ``account_id`` by ``amount`` to the outside world (overdraft rule applies)."""
    _check_amount(amount)
    return _LEDGER.cash(uuid.uuid4(), _opt_uuid(user_id), _uuid(account_id, "account_id"),
                           amount, currency, False, description)


def transfer(user_id, from_account_id, to_account_id, amount, *, currency=None,
             description=None):
    """Move ``amount`` between two accounts both owned by ``user_id``.

    Writes a Transfer row and its two entries; the Posting's movement_id is
    the transfer's id.
    """
    _check_amount(amount)
    from_id = _uuid(from_account_id, "from_account_id")
    to_id = _uuid(to_account_id, "to_account_id")
    if from_id == to_id:
        raise errors.SameAccount("cannot transfer to the same account", field="to_account_id")
    transfer_id = uuid.uuid4()
    return _LEDGER.transfer(transfer_id, _uuid(user_id, "user_id"), from_id, to_id, amount,
                               currency, new_reference("TRF", transfer_id), description)


def p2p_payment(sender_id, sender_account_id, recipient_account_id, amount, *, currency=None,
                note=None):
    """Pay another user: from the sender's account into the recipient's account.

    Writes a P2PTransaction row and its two entries; the Posting's movement_id
    is the payment's id. Paying yourself is refused.
    """
    _check_amount(amount)
    payment_id = uuid.uuid4()
    return _LEDGER.p2p(payment_id, _uuid(sender_id, "sender_id"),
                          _uuid(sender_account_id, "account_id"),
                          _uuid(recipient_account_id, "recipient"), amount, currency,
                          new_reference("P2P", payment_id), note)


def reverse(entry_id, *, description=None):
    """Undo the movement ``entry_id`` belongs to with a new, reversing pair.

    Each reversing entry points at the entry it reverses; an entry can be
    reversed once. Frozen accounts may be reversed into or out of; closed
    ones may not. A reversed transfer or P2P payment gets status
    ``reversed`` and the reversing movement's id. A card payment gives back
    only what its refunds have not (refused when refunded in full), under
    the card's lock; an investment order is refused (its holding would not
    follow: the opposite order is the way back).
    """
    return _LEDGER.reverse(_uuid(entry_id, "entry_id"), uuid.uuid4(),
                              description or "Reversal")


def card_payment(user_id, card_id, amount, *, merchant_name, merchant_category, channel,
                 international=False, currency=None, description=None, now=None):
    """Pay a merchant with a card: one debit of the card's account carrying the card id.

    The card row is locked first, so concurrent payments on one card can
    never exceed its daily (UTC day) or monthly (UTC month) limit; spent is
    what left the account on this card in the period, less what came back.
    The period is the UTC day and month of ``now`` (the application's
    clock); the entry itself is stamped by the database.
    """
    _check_amount(amount)
    if channel not in CARD_CHANNELS:
        raise errors.ValidationError(f"channel must be one of {', '.join(CARD_CHANNELS)}",
                                     field="channel")
    return _LEDGER.card_payment(uuid.uuid4(), _uuid(user_id, "user_id"),
                                   _uuid(card_id, "card_id"), amount, currency, merchant_name,
                                   merchant_category, channel, bool(international),
                                   description or merchant_name, now or utcnow())


def card_refund(user_id, payment_entry_id, amount, *, description=None):
    """Give back up to the rest of a card payment; each refund entry points at it.

    A reversed payment cannot be refunded (PaymentReversed), and a frozen
    account takes no refund (AccountNotActive).
    """
    _check_amount(amount)
    return _LEDGER.card_refund(uuid.uuid4(), _uuid(user_id, "user_id"),
                                  _uuid(payment_entry_id, "payment_id"), amount,
                                  description or "Refund")


def authorize(user_id, card_id, amount, *, merchant_name, merchant_category, channel,
              international=False, currency=None, description=None, expires_in=None, now):
    """Place a hold on the card's account: the card rules of a payment, nothing moved.

    The hold reserves ``amount`` (counted by every later funds check and
    against the card's limits) until captured, voided or ``now +
    expires_in`` (default 7 days, at most 30). ``now`` is the app's clock.
    """
    _check_amount(amount)
    if channel not in CARD_CHANNELS:
        raise errors.ValidationError(f"channel must be one of {', '.join(CARD_CHANNELS)}",
                                     field="channel")
    expires_in = HOLD_DEFAULT_EXPIRY if expires_in is None else expires_in
    if not timedelta(0) < expires_in <= HOLD_MAX_EXPIRY:
        raise errors.ValidationError("an authorization lasts more than zero and at most "
                                     f"{HOLD_MAX_EXPIRY.days} days", field="expires_in_days")
    return _LEDGER.authorize(uuid.uuid4(), _uuid(user_id, "user_id"), _uuid(card_id, "card_id"),
                             amount, currency, merchant_name, merchant_category, channel,
                             bool(international), description, expires_in, _aware(now))


def capture(user_id, hold_id, amount=None, *, now):
    """Capture an active hold once, for ``amount`` (default: all of it) ≤ what it holds.

    The rest is released. Posts a card payment (refundable and reversible
    like one). Returns ``(Hold, Posting)``. A resolved hold is
    AuthorizationResolved, an expired one AuthorizationExpired (409).
    """
    if amount is not None:
        _check_amount(amount)
    return _LEDGER.capture(uuid.uuid4(), _uuid(user_id, "user_id"),
                           _uuid(hold_id, "authorization_id"), amount, _aware(now))


def void(user_id, hold_id, *, now):
    """Release an active hold without moving money; returns the voided ``Hold``."""
    return _LEDGER.void(_uuid(user_id, "user_id"), _uuid(hold_id, "authorization_id"),
                        _aware(now))


def expire_holds(now, *, batch_size=EXPIRE_BATCH):
    """Record every hold past its expiry at ``now`` as expired; return how many.

    Holds stop counting at their expiry whether or not this ran: it only
    writes down what is already true. Each batch is its own transaction.
    """
    now, total = _aware(now), 0
    while True:
        with db.atomic():
            done = _LEDGER.expire_holds(now, batch_size)
        total += done
        if done < batch_size:
            return total


def batch(user_id, legs):
    """Post every leg of a batch, or none: one ledger call, accounts locked in id order.

    ``legs`` are ``BatchLeg``s (1 to BATCH_MAX_LEGS). Returns one Posting per
    leg, in order. Refused as a whole with BatchRefused whose ``failures``
    are ``{index, code, side, message}`` (``code`` a domain error code,
    ``side`` source or destination when the failure is one account's).
    """
    if not 1 <= len(legs) <= BATCH_MAX_LEGS:
        raise errors.ValidationError(f"a batch has 1 to {BATCH_MAX_LEGS} legs", field="legs")
    for leg in legs:
        _check_amount(leg.amount)
    return _LEDGER.batch(_uuid(user_id, "user_id"), legs)


def _aware(now):
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(timezone.utc)


def buy(user_id, account_id, symbol, quantity):
    """Buy ``quantity`` of ``symbol`` at the current price with cash from an investment account.

    The cash leg is quantity x price rounded UP to the minor unit (sells round
    down): rounding is in the house's favour, so no sequence of orders can
    make money out of it. It may not exceed MAX_MINOR_UNITS (AmountError).
    """
    return _trade(user_id, account_id, symbol, quantity, True)


def sell(user_id, account_id, symbol, quantity):
    """Sell ``quantity`` of ``symbol`` at the current price into an investment account."""
    return _trade(user_id, account_id, symbol, quantity, False)


def set_price(symbol, price, *, name=None, type=None, currency=None):
    """Create or update an instrument's price; holdings' current price follows."""
    price = parse_quantity(price, "price")
    with db.atomic():
        existing = InstrumentPrice.get_or_none(InstrumentPrice.symbol == symbol)
        if existing is None:
            if not name or type not in INVESTMENT_TYPES:
                raise errors.ValidationError(
                    f"a new symbol needs a name and a type ({', '.join(INVESTMENT_TYPES)})",
                    field="type" if name else "name")
            get_currency(currency or "")
            InstrumentPrice.create(symbol=symbol, name=name, type=type, currency=currency,
                                   price=price)
        else:
            changes = {InstrumentPrice.price: price,
                       InstrumentPrice.updated_at: utcnow()}
            if name:
                changes[InstrumentPrice.name] = name
            (InstrumentPrice.update(changes)
             .where(InstrumentPrice.symbol == symbol)
             .execute())
        (Investment.update(current_price=price, updated_at=utcnow())
         .where(Investment.symbol == symbol)
         .execute())
    return InstrumentPrice.get_by_id(symbol)


def parse_quantity(value, field):
    """A positive quantity or price -> Decimal: the one parser of both.

    A decimal string as the user typed it (no sign, no exponent, no spaces),
    at most 16 digits before the point and ``QUANTITY_PLACES`` after, or a
    Decimal or int that would be written so. Floats, and JSON numbers that may
    have been floats on the way, are refused: a quantity must arrive exact.
    """
    if isinstance(value, Decimal):
        text = format(value, "f") if value.is_finite() else ""
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        text = value if isinstance(value, str) else ""
    if not _QUANTITY.fullmatch(text):
        raise errors.ValidationError(
            f"{field} must be a decimal string such as \"1.5\" with at most "
            f"{QUANTITY_PLACES} decimal places and 16 digits before them", field=field)
    quantity = Decimal(text)
    if quantity <= 0:
        raise errors.ValidationError(f"{field} must be greater than zero", field=field)
    return quantity


def _trade(user_id, account_id, symbol, quantity, is_buy):
    quantity = parse_quantity(quantity, "quantity")
    if not isinstance(symbol, str) or not 1 <= len(symbol) <= 12:
        raise errors.ValidationError("symbol must be 1 to 12 characters", field="symbol")
    return _LEDGER.trade(uuid.uuid4(), _uuid(user_id, "user_id"),
                            _uuid(account_id, "account_id"), symbol.upper(), quantity, is_buy)


def verify():
    """Check the books; return a list of problems (empty when they balance).

    1. each account's balance equals the signed sum of its entries;
    2. each movement's entries sum to zero, and every transfer and P2P payment
       has exactly two entries of equal amount and opposite direction;
    3. every currency sums to zero over all accounts;
    4. no customer balance is below its overdraft limit;
    5. a transfer or P2P payment is ``reversed`` exactly when a reversing
       movement (its ``reversal_id``) undoes its entries;
    6. each holding's quantity is what the trades on its account and symbol
       bought less what they sold, and its cost basis lies between zero
       (zero when nothing is held) and what those buys paid;
    7. every card hold is resolved at most once: its status and resolution
       agree, and a captured hold has exactly one capture movement, a card
       payment of its captured amount on its account and card;
    8. no hold captured more than it held;
    9. every account's available balance (balance - its active holds, as
       the API shows it) equals balance minus the holds counted directly,
       and is not below minus its overdraft limit.
    """
    problems = []
    signed = "CASE t.direction WHEN 'inbound' THEN t.amount ELSE -t.amount END"
    for account_id, balance, total in db.execute_sql(
            f"SELECT a.id, a.balance, COALESCE(SUM({signed}), 0) FROM accounts a "
            "LEFT JOIN transactions t ON t.account_id = a.id "
            f"GROUP BY a.id, a.balance HAVING a.balance <> COALESCE(SUM({signed}), 0)"):
        problems.append(f"account {account_id}: balance {balance} but entries sum to {total}")
    for movement_id, total, count in db.execute_sql(
            f"SELECT t.movement_id, SUM({signed}), COUNT(*) FROM transactions t "
            f"GROUP BY t.movement_id HAVING SUM({signed}) <> 0 OR COUNT(*) < 2"):
        problems.append(f"movement {movement_id}: {count} entries summing to {total}, not zero")
    for table, column in (("transfers", "transfer_id"), ("p2p_transactions", "p2p_id")):
        for row_id, count, inbound, outbound in db.execute_sql(
                f"SELECT m.id, COUNT(t.id), "
                f"SUM(CASE WHEN t.direction = 'inbound' AND t.amount = m.amount THEN 1 ELSE 0 END), "
                f"SUM(CASE WHEN t.direction = 'outbound' AND t.amount = m.amount THEN 1 ELSE 0 END) "
                f"FROM {table} m LEFT JOIN transactions t "
                f"ON t.{column} = m.id AND t.movement_id = m.id "
                f"WHERE m.status IN ('completed', 'reversed') GROUP BY m.id "
                f"HAVING COUNT(t.id) <> 2 OR SUM(CASE WHEN t.direction = 'inbound' "
                f"AND t.amount = m.amount THEN 1 ELSE 0 END) <> 1"):
            problems.append(f"{table} {row_id}: {count} entries ({inbound or 0} in, "
                            f"{outbound or 0} out), expected one of each for its amount")
    for table in ("transfers", "p2p_transactions"):
        # A reversed movement's own two entries are each reversed by its
        # reversal_id; a completed one's by nothing.
        for row_id, status, undone in db.execute_sql(
                f"SELECT m.id, m.status, COUNT(r.id) FROM {table} m "
                f"JOIN transactions o ON o.movement_id = m.id "
                f"LEFT JOIN transactions r ON r.reverses_id = o.id "
                f"WHERE m.status IN ('completed', 'reversed') GROUP BY m.id, m.status "
                f"HAVING CASE m.status WHEN 'reversed' THEN COUNT(r.id) <> 2 OR COUNT(r.id) "
                f"FILTER (WHERE r.movement_id = m.reversal_id) <> 2 ELSE COUNT(r.id) <> 0 END"):
            problems.append(f"{table} {row_id}: status {status} but {undone} of its entries "
                            "reversed by its reversal")
    for holding_id, quantity, traded, basis, bought in db.execute_sql(
            "SELECT i.id, i.quantity, COALESCE(t.traded, 0), i.cost_basis, "
            "COALESCE(t.bought, 0) FROM investments i LEFT JOIN ("
            "SELECT account_id, symbol, "
            "SUM(CASE type WHEN 'investment_buy' THEN quantity ELSE -quantity END) AS traded, "
            "SUM(CASE type WHEN 'investment_buy' THEN amount ELSE 0 END) AS bought "
            "FROM transactions WHERE symbol IS NOT NULL GROUP BY account_id, symbol) t "
            "ON t.account_id = i.account_id AND t.symbol = i.symbol "
            "WHERE i.quantity <> COALESCE(t.traded, 0) OR i.cost_basis < 0 "
            "OR i.cost_basis > COALESCE(t.bought, 0) OR (i.quantity = 0 AND i.cost_basis <> 0)"):
        problems.append(f"holding {holding_id}: quantity {quantity} and cost basis {basis}, "
                        f"but its trades net {traded} for {bought} paid")
    for account_id, symbol, traded in db.execute_sql(
            "SELECT t.account_id, t.symbol, "
            "SUM(CASE t.type WHEN 'investment_buy' THEN t.quantity ELSE -t.quantity END) "
            "FROM transactions t WHERE t.symbol IS NOT NULL AND NOT EXISTS ("
            "SELECT 1 FROM investments i WHERE i.account_id = t.account_id "
            "AND i.symbol = t.symbol) GROUP BY t.account_id, t.symbol"):
        problems.append(f"account {account_id}: trades of {symbol} net {traded} "
                        "but there is no holding")
    problems.extend(_verify_holds())
    for currency, total in db.execute_sql(
            "SELECT currency, SUM(balance) FROM accounts GROUP BY currency "
            "HAVING SUM(balance) <> 0"):
        problems.append(f"currency {currency}: balances sum to {total}, not zero")
    for account_id, balance, limit in db.execute_sql(
            "SELECT id, balance, overdraft_limit FROM accounts "
            "WHERE type <> 'settlement' AND balance < -overdraft_limit"):
        problems.append(f"account {account_id}: balance {balance} below overdraft limit {limit}")
    return problems


def _verify_holds():
    problems = []
    for hold_id, status in db.execute_sql(
            "SELECT id, status FROM card_holds WHERE "
            "(status = 'active') <> (resolved_at IS NULL) "
            "OR (status = 'captured') <> (captured_amount IS NOT NULL) "
            "OR (status = 'captured') <> (capture_movement_id IS NOT NULL) "
            "OR status NOT IN ('active', 'captured', 'voided', 'expired')"):
        problems.append(f"hold {hold_id}: status {status} disagrees with its resolution")
    for hold_id, amount, captured in db.execute_sql(
            "SELECT id, amount, captured_amount FROM card_holds "
            "WHERE captured_amount > amount OR captured_amount <= 0"):
        problems.append(f"hold {hold_id}: captured {captured} of {amount} held")
    for hold_id, entries, payments in db.execute_sql(
            "SELECT h.id, COUNT(t.id), COUNT(t.id) FILTER (WHERE t.direction = 'outbound' "
            "AND t.type = 'payment' AND t.account_id = h.account_id AND t.card_id = h.card_id "
            "AND t.amount = h.captured_amount) FROM card_holds h "
            "LEFT JOIN transactions t ON t.movement_id = h.capture_movement_id "
            "WHERE h.status = 'captured' GROUP BY h.id "
            "HAVING COUNT(t.id) <> 2 OR COUNT(t.id) FILTER (WHERE t.direction = 'outbound' "
            "AND t.type = 'payment' AND t.account_id = h.account_id AND t.card_id = h.card_id "
            "AND t.amount = h.captured_amount) <> 1"):
        problems.append(f"hold {hold_id}: captured, but its capture movement has {entries} "
                        f"entries and {payments} matching card payment(s), not 2 and 1")
    for account_id, balance, shown, counted, limit in db.execute_sql(
            "SELECT a.id, a.balance, a.balance - hoardrun_held(a.id, n.at), "
            "a.balance - COALESCE(h.held, 0), a.overdraft_limit "
            "FROM (SELECT clock_timestamp() AS at) n CROSS JOIN accounts a "
            "LEFT JOIN LATERAL (SELECT SUM(x.amount) AS held FROM card_holds x "
            "WHERE x.account_id = a.id AND x.status = 'active' AND x.expires_at > n.at) h "
            "ON TRUE "
            "WHERE a.balance - hoardrun_held(a.id, n.at) <> a.balance - COALESCE(h.held, 0) "
            "OR (a.type <> 'settlement' "
            "AND a.balance - hoardrun_held(a.id, n.at) < -a.overdraft_limit)"):
        problems.append(f"account {account_id}: balance {balance}, available {shown} (holds "
                        f"counted directly: {counted}), overdraft limit {limit}")
    return problems


def settlement_account_ids(currency):
    """The ids of ``currency``'s settlement accounts (its buckets), in bucket order.

    A currency has as many as its cash movements have needed at once (none
    before its first one); together they stand for the world outside.
    """
    return [as_uuid(account_id) for (account_id,) in db.execute_sql(
        "SELECT id FROM accounts WHERE type = 'settlement' AND currency = %s "
        "ORDER BY settlement_bucket", (currency,))]


def _opt_uuid(value):
    return None if value is None else _uuid(value, "user_id")


# --------------------------------------------------------------------------
# The ledger functions: one call per movement
# --------------------------------------------------------------------------

def _hex(value):
    return None if value is None else value.hex


class _PostgresLedger:
    def _call(self, function, *args):
        sql = f"SELECT * FROM {function}({', '.join(['%s'] * len(args))})"
        try:
            row = db.execute_sql(sql, args).fetchone()
        except pw.DatabaseError as exc:
            raise _translate_pg(exc) from None
        return _posting(row)

    def cash(self, movement_id, user_id, account_id, amount, currency, inbound, description):
        return self._call("hoardrun_cash", movement_id.hex, _hex(user_id), account_id.hex,
                          amount, currency, inbound, description)

    def transfer(self, transfer_id, user_id, from_id, to_id, amount, currency, reference,
                 description):
        return self._call("hoardrun_transfer", transfer_id.hex, user_id.hex, from_id.hex,
                          to_id.hex, amount, currency, reference, description)

    def p2p(self, payment_id, sender_id, sender_account, recipient_account, amount, currency,
            reference, note):
        return self._call("hoardrun_p2p", payment_id.hex, sender_id.hex, sender_account.hex,
                          recipient_account.hex, amount, currency, reference, note)

    def reverse(self, entry_id, movement_id, description):
        # A racing second reversal trips the UNIQUE(reverses_id) index: see _translate_pg.
        return self._call("hoardrun_reverse", entry_id.hex, movement_id.hex, description)

    def card_payment(self, movement_id, user_id, card_id, amount, currency, merchant_name,
                     merchant_category, channel, international, description, now):
        return self._call("hoardrun_card_payment", movement_id.hex, user_id.hex, card_id.hex,
                          amount, currency, merchant_name, merchant_category, channel,
                          international, description, now)

    def card_refund(self, movement_id, user_id, payment_id, amount, description):
        return self._call("hoardrun_card_refund", movement_id.hex, user_id.hex, payment_id.hex,
                          amount, description)

    def trade(self, movement_id, user_id, account_id, symbol, quantity, is_buy):
        sql = ("SELECT (t.posting).*, t.holding_id, t.price, t.held_quantity, t.cost_basis "
               "FROM hoardrun_trade(%s, %s, %s, %s, %s, %s) t")
        try:
            row = db.execute_sql(sql, (movement_id.hex, user_id.hex, account_id.hex, symbol,
                                       quantity, is_buy)).fetchone()
        except pw.DatabaseError as exc:
            raise _translate_pg(exc) from None
        posting = _posting(row[:10])
        holding_id, price, held, basis = row[10:]
        return Trade(posting, as_uuid(holding_id), symbol, quantity, Decimal(price),
                     posting.amount, Decimal(held), int(basis))

    def authorize(self, hold_id, user_id, card_id, amount, currency, merchant_name,
                  merchant_category, channel, international, description, expires_in, now):
        sql = (f"SELECT {', '.join('h.' + c for c in HOLD_COLUMNS)} FROM hoardrun_authorize("
               "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) h")
        return hold_from_row(self._row(sql, (
            hold_id.hex, user_id.hex, card_id.hex, amount, currency, merchant_name,
            merchant_category, channel, international, description, expires_in, now)))

    def capture(self, movement_id, user_id, hold_id, amount, now):
        sql = (f"SELECT {', '.join('(r.hold).' + c for c in HOLD_COLUMNS)}, (r.posting).* "
               "FROM hoardrun_capture(%s, %s, %s, %s, %s) r")
        row = self._row(sql, (movement_id.hex, user_id.hex, hold_id.hex, amount, now))
        return hold_from_row(row[:len(HOLD_COLUMNS)]), _posting(row[len(HOLD_COLUMNS):])

    def void(self, user_id, hold_id, now):
        sql = (f"SELECT {', '.join('h.' + c for c in HOLD_COLUMNS)} "
               "FROM hoardrun_void(%s, %s, %s) h")
        return hold_from_row(self._row(sql, (user_id.hex, hold_id.hex, now)))

    def expire_holds(self, now, limit):
        return int(self._row("SELECT hoardrun_expire_holds(%s, %s)", (now, limit))[0])

    def batch(self, user_id, legs):
        sql = ("SELECT * FROM hoardrun_batch(%s, %s::uuid[], %s::boolean[], %s::uuid[], "
               "%s::uuid[], %s::bigint[], %s::text[], %s::text[])")
        args = (user_id.hex, [leg.id.hex for leg in legs], [leg.p2p for leg in legs],
                [leg.from_account_id.hex for leg in legs],
                [leg.to_account_id.hex for leg in legs], [leg.amount for leg in legs],
                [leg.reference for leg in legs], [leg.text for leg in legs])
        try:
            rows = db.execute_sql(sql, args).fetchall()
        except pw.DatabaseError as exc:
            orig = driver_error(exc)
            if getattr(orig, "pgcode", None) == "HR030":
                failures = json.loads(orig.diag.message_detail)
                raise errors.BatchRefused("no leg was made: " + ", ".join(
                    f"leg {f['index']}" for f in failures) + " cannot be", failures=[
                        dict(f, code=_PG_ERRORS[f["code"]].code) for f in failures]) from None
            raise _translate_pg(exc) from None
        return [_posting(row) for row in rows]

    def _row(self, sql, args):
        try:
            return db.execute_sql(sql, args).fetchone()
        except pw.DatabaseError as exc:
            raise _translate_pg(exc) from None


def _translate_pg(exc):
    """Turn a database error from a ledger function into a domain error."""
    orig = driver_error(exc)
    code = getattr(orig, "pgcode", None)
    diag = getattr(orig, "diag", None)
    message = getattr(diag, "message_primary", None) or str(orig)
    if code in _PG_ERRORS:
        return _PG_ERRORS[code](message)
    if code == "23505" and "reverses" in (getattr(diag, "constraint_name", "") or ""):
        return errors.ReversalNotAllowed("already reversed")
    if code == "23514" and "balance_floor" in (getattr(diag, "constraint_name", "") or ""):
        return errors.InsufficientFunds("insufficient funds")
    if code == "23503":
        return errors.NotFound("account not found")
    if code == "22003":
        # numeric_value_out_of_range: a cash amount the function computed from
        # the request (a trade's quantity x price) does not fit BIGINT minor units.
        return errors.AmountError("the amount is too large")
    return exc


def _posting(row):
    (movement_id, currency, amount, debit_account, debit_entry, debit_balance,
     credit_account, credit_entry, credit_balance, posted_at) = row
    return Posting(
        movement_id=as_uuid(movement_id), currency=currency, amount=int(amount),
        debit=Leg(as_uuid(debit_account), as_uuid(debit_entry), int(debit_balance)),
        credit=Leg(as_uuid(credit_account), as_uuid(credit_entry), int(credit_balance)),
        posted_at=to_utc(posted_at),
    )


_LEDGER = _PostgresLedger()
