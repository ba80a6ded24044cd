"""Every money movement goes through here, in one database transaction.

Each movement posts exactly two immutable entries (double entry) that share
a ``movement_id``: the account debited gets an outbound entry, the account
credited an inbound one, each with the balance it left behind. Deposits and
withdrawals post against the currency's settlement account, so every
currency sums to zero over all accounts.

PostgreSQL: one call to a reviewed PL/pgSQL function (migration 002) that
locks both accounts FOR UPDATE in id order, checks the rules under the lock
and writes everything: one round trip, one implicit transaction.
SQLite: the same rules in Python under BEGIN IMMEDIATE (the write lock up
front). The same tests run against both.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal

import peewee as pw

from . import errors
from .db import db, driver_error, is_postgres, to_utc
from .ids import parse_id
from .models import CARD_CHANNELS, INVESTMENT_TYPES, InstrumentPrice, Investment
from .money import MAX_MINOR_UNITS, get_currency, round_to_minor

#: Investment quantities carry at most this many decimal places (NUMERIC(24, 8)).
QUANTITY_PLACES = 8

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
    "HR404": errors.NotFound,
}


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


def new_reference(prefix, ident):
    """A unique, human-quotable reference derived from a movement's id."""
    return f"{prefix}-{ident.hex.upper()}"


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
    return _backend().cash(uuid.uuid4(), _opt_uuid(user_id), _uuid(account_id, "account_id"),
                           amount, currency, True, description)


def withdraw(account_id, amount, *, user_id=None, currency=None, description=None):
    """Debit ``account_id`` by ``amount`` to the outside world (overdraft rule applies)."""
    _check_amount(amount)
    return _backend().cash(uuid.uuid4(), _opt_uuid(user_id), _uuid(account_id, "account_id"),
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
    return _backend().transfer(transfer_id, _uuid(user_id, "user_id"), from_id, to_id, amount,
                               currency, new_reference("TRF", transfer_id), description)


def p2p_payment(sender_id, sender_account_id, recipient_account_id, amount, *, currency=None,
                note=None):
    """Pay another user: from the sender's account into the recipient's account.

    Writes a P2PTransaction row and its two entries; the Posting's movement_id
    is the payment's id. Paying yourself is refused.
    """
    _check_amount(amount)
    payment_id = uuid.uuid4()
    return _backend().p2p(payment_id, _uuid(sender_id, "sender_id"),
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
    return _backend().reverse(_uuid(entry_id, "entry_id"), uuid.uuid4(),
                              description or "Reversal")


def card_payment(user_id, card_id, amount, *, merchant_name, merchant_category, channel,
                 international=False, currency=None, description=None):
    """Pay a merchant with a card: one debit of the card's account carrying the card id.

    The card row is locked first, so concurrent payments on one card can
    never exceed its daily (UTC day) or monthly (UTC month) limit; spent is
    what left the account on this card in the period, less what came back.
    """
    _check_amount(amount)
    if channel not in CARD_CHANNELS:
        raise errors.ValidationError(f"channel must be one of {', '.join(CARD_CHANNELS)}",
                                     field="channel")
    return _backend().card_payment(uuid.uuid4(), _uuid(user_id, "user_id"),
                                   _uuid(card_id, "card_id"), amount, currency, merchant_name,
                                   merchant_category, channel, bool(international),
                                   description or merchant_name)


def card_refund(user_id, payment_entry_id, amount, *, description=None):
    """Give back up to the rest of a card payment; each refund entry points at it.

    A reversed payment cannot be refunded (PaymentReversed), and a frozen
    account takes no refund (AccountNotActive).
    """
    _check_amount(amount)
    return _backend().card_refund(uuid.uuid4(), _uuid(user_id, "user_id"),
                                  _uuid(payment_entry_id, "payment_id"), amount,
                                  description or "Refund")


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
    price = _check_quantity(price, "price")
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
                       InstrumentPrice.updated_at: datetime.now(timezone.utc)}
            if name:
                changes[InstrumentPrice.name] = name
            (InstrumentPrice.update(changes)
             .where(InstrumentPrice.symbol == symbol)
             .execute())
        (Investment.update(current_price=price, updated_at=datetime.now(timezone.utc))
         .where(Investment.symbol == symbol)
         .execute())
    return InstrumentPrice.get_by_id(symbol)


def _check_quantity(value, field):
    if isinstance(value, (bool, float)) or not isinstance(value, (Decimal, int, str)):
        raise errors.ValidationError(f"{field} must be a decimal string", field=field)
    try:
        dec = Decimal(str(value).strip())
    except ArithmeticError:
        raise errors.ValidationError(f"{field} must be a decimal string", field=field) from None
    if not dec.is_finite() or dec <= 0:
        raise errors.ValidationError(f"{field} must be greater than zero", field=field)
    if -dec.as_tuple().exponent > QUANTITY_PLACES or dec >= Decimal(10) ** 16:
        raise errors.ValidationError(
            f"{field} allows at most {QUANTITY_PLACES} decimal places and 16 digits before them",
            field=field)
    return dec


def _trade(user_id, account_id, symbol, quantity, is_buy):
    quantity = _check_quantity(quantity, "quantity")
    if not isinstance(symbol, str) or not 1 <= len(symbol) <= 12:
        raise errors.ValidationError("symbol must be 1 to 12 characters", field="symbol")
    return _backend().trade(uuid.uuid4(), _uuid(user_id, "user_id"),
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
       (zero when nothing is held) and what those buys paid.
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
    for currency, total in db.execute_sql(
            "SELECT currency, SUM(balance) FROM accounts GROUP BY currency "
            "HAVING SUM(balance) <> 0"):
        problems.append(f"currency {currency}: balances sum to {total}, not zero")
    for account_id, balance, limit in db.execute_sql(
            "SELECT id, balance, overdraft_limit FROM accounts "
            "WHERE type <> 'settlement' AND balance < -overdraft_limit"):
        problems.append(f"account {account_id}: balance {balance} below overdraft limit {limit}")
    return problems


def settlement_account_id(currency):
    """The id of ``currency``'s settlement account, creating it on first use."""
    return _backend().settlement_account(currency)


def _opt_uuid(value):
    return None if value is None else _uuid(value, "user_id")


def _backend():
    return _POSTGRES if is_postgres() else _SQLITE


# --------------------------------------------------------------------------
# PostgreSQL: one function call per movement
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
                     merchant_category, channel, international, description):
        return self._call("hoardrun_card_payment", movement_id.hex, user_id.hex, card_id.hex,
                          amount, currency, merchant_name, merchant_category, channel,
                          international, description)

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
        return Trade(posting, uuid.UUID(str(holding_id)), symbol, quantity, Decimal(price),
                     posting.amount, Decimal(held), int(basis))

    def settlement_account(self, currency):
        row = db.execute_sql("SELECT hoardrun_settlement_account(%s)", (currency,)).fetchone()
        return uuid.UUID(str(row[0]))


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
        movement_id=uuid.UUID(str(movement_id)), currency=currency, amount=int(amount),
        debit=Leg(uuid.UUID(str(debit_account)), uuid.UUID(str(debit_entry)), int(debit_balance)),
        credit=Leg(uuid.UUID(str(credit_account)), uuid.UUID(str(credit_entry)),
                   int(credit_balance)),
        posted_at=to_utc(posted_at),
    )


# --------------------------------------------------------------------------
# SQLite: the same rules in Python, under BEGIN IMMEDIATE
# --------------------------------------------------------------------------

_ACCOUNT_COLUMNS = "id, user_id, type, status, currency, balance, overdraft_limit"
_BIGINT_MAX = 2 ** 63 - 1


@dataclass
class _Row:
    id: str
    user_id: str
    type: str
    status: str
    currency: str
    balance: int
    overdraft_limit: int


class _SqliteLedger:
    def _account(self, account_id):
        row = db.execute_sql(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?",
                             (account_id.hex,)).fetchone()
        return _Row(*row) if row else None

    def _lock_pair(self, debit_id, credit_id, amount, currency, allow_frozen=False):
        # BEGIN IMMEDIATE already holds the database's write lock: no row
        # locks exist in SQLite, and none are needed.
        if debit_id == credit_id:
            raise errors.SameAccount("source and destination are the same account")
        debit, credit = self._account(debit_id), self._account(credit_id)
        if debit is None or credit is None:
            raise errors.NotFound("account not found")
        for acc in (debit, credit):
            if acc.status != "active" and not (allow_frozen and acc.status == "suspended"):
                raise errors.AccountNotActive(f"account {uuid.UUID(acc.id)} is {acc.status}")
        if debit.currency != credit.currency or (currency is not None
                                                 and currency != debit.currency):
            shown = f" / requested {currency}" if currency else ""
            raise errors.CurrencyMismatch(
                f"currency mismatch: {debit.currency} / {credit.currency}{shown}")
        if debit.type != "settlement" and debit.balance - amount < -debit.overdraft_limit:
            raise errors.InsufficientFunds("insufficient funds")
        return debit, credit

    def _apply_pair(self, movement_id, debit, credit, amount, debit_type, credit_type,
                    description, transfer_id=None, p2p_id=None, reverses=(None, None),
                    card_id=None, merchant=(None, None), refund_of=None, now=None):
        now = now or datetime.now(timezone.utc)
        stamp = _text(now)
        debit_balance = debit.balance - amount
        credit_balance = credit.balance + amount
        db.execute_sql("UPDATE accounts SET balance = ?, updated_at = ? WHERE id = ?",
                       (debit_balance, stamp, debit.id))
        db.execute_sql("UPDATE accounts SET balance = ?, updated_at = ? WHERE id = ?",
                       (credit_balance, stamp, credit.id))
        debit_entry, credit_entry = uuid.uuid4(), uuid.uuid4()
        for entry, acc, kind, direction, balance, reverses_id, refund in (
                (debit_entry, debit, debit_type, "outbound", debit_balance, reverses[0], None),
                (credit_entry, credit, credit_type, "inbound", credit_balance, reverses[1],
                 refund_of)):
            db.execute_sql(
                "INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, "
                "currency, balance_after, description, merchant_name, merchant_category, "
                "card_id, transfer_id, p2p_id, reverses_id, reference, status, created_at, "
                "refund_of_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'completed', ?, ?)",
                (entry.hex, acc.id, movement_id.hex, kind, direction, amount, acc.currency,
                 balance, description, merchant[0], merchant[1], _hex(card_id),
                 _hex(transfer_id), _hex(p2p_id), reverses_id, "E" + entry.hex, stamp,
                 _hex(refund)))
        return Posting(movement_id, debit.currency, amount,
                       Leg(uuid.UUID(debit.id), debit_entry, debit_balance),
                       Leg(uuid.UUID(credit.id), credit_entry, credit_balance), now)

    def settlement_account(self, currency):
        row = db.execute_sql("SELECT id FROM accounts WHERE type = 'settlement' AND currency = ?",
                             (currency,)).fetchone()
        if row:
            return uuid.UUID(row[0])
        new_id = uuid.uuid4()
        number = "99" + "".join(str(ord(ch)) for ch in currency)
        db.execute_sql(
            "INSERT INTO accounts (id, user_id, account_number, name, type, status, currency) "
            "VALUES (?, NULL, ?, ?, 'settlement', 'active', ?) ON CONFLICT DO NOTHING",
            (new_id.hex, number, f"Settlement {currency}", currency))
        return self.settlement_account(currency)

    def cash(self, movement_id, user_id, account_id, amount, currency, inbound, description):
        with db.atomic():
            acc = self._account(account_id)
            if acc is None or acc.type == "settlement" or (
                    user_id is not None and acc.user_id != user_id.hex):
                raise errors.NotFound("account not found")
            settlement = self.settlement_account(acc.currency)
            if inbound:
                debit, credit = self._lock_pair(settlement, account_id, amount, currency)
                return self._apply_pair(movement_id, debit, credit, amount, "settlement",
                                        "deposit", description)
            debit, credit = self._lock_pair(account_id, settlement, amount, currency)
            return self._apply_pair(movement_id, debit, credit, amount, "withdrawal",
                                    "settlement", description)

    def transfer(self, transfer_id, user_id, from_id, to_id, amount, currency, reference,
                 description):
        with db.atomic():
            debit, credit = self._lock_pair(from_id, to_id, amount, currency)
            if debit.user_id != user_id.hex or credit.user_id != user_id.hex:
                raise errors.NotFound("account not found")
            now = datetime.now(timezone.utc)
            db.execute_sql(
                "INSERT INTO transfers (id, user_id, from_account_id, to_account_id, amount, "
                "currency, reference, description, status, created_at, completed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'completed', ?, ?)",
                (transfer_id.hex, user_id.hex, from_id.hex, to_id.hex, amount, debit.currency,
                 reference, description, _text(now), _text(now)))
            return self._apply_pair(transfer_id, debit, credit, amount, "transfer_out",
                                    "transfer_in", description, transfer_id=transfer_id, now=now)

    def p2p(self, payment_id, sender_id, sender_account, recipient_account, amount, currency,
            reference, note):
        with db.atomic():
            debit, credit = self._lock_pair(sender_account, recipient_account, amount, currency)
            if debit.user_id != sender_id.hex or credit.user_id is None:
                raise errors.NotFound("account not found")
            if credit.user_id == sender_id.hex:
                raise errors.SameAccount("cannot pay yourself")
            now = datetime.now(timezone.utc)
            db.execute_sql(
                "INSERT INTO p2p_transactions (id, sender_id, recipient_id, sender_account_id, "
                "recipient_account_id, amount, currency, note, reference, status, created_at, "
                "completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'completed', ?, ?)",
                (payment_id.hex, sender_id.hex, credit.user_id, sender_account.hex,
                 recipient_account.hex, amount, debit.currency, note, reference,
                 _text(now), _text(now)))
            return self._apply_pair(payment_id, debit, credit, amount, "p2p_out", "p2p_in", note,
                                    p2p_id=payment_id, now=now)

    def reverse(self, entry_id, movement_id, description):
        with db.atomic():
            cols = ("id, account_id, movement_id, type, direction, amount, currency, transfer_id, "
                    "p2p_id, card_id")
            entry = db.execute_sql(f"SELECT {cols} FROM transactions WHERE id = ?",
                                   (entry_id.hex,)).fetchone()
            if entry is None:
                raise errors.NotFound("entry not found")
            e_id, e_account, e_movement, e_type, e_direction, amount, currency, tr, p2p, card = entry
            if e_type == "reversal":
                raise errors.ReversalNotAllowed("a reversal cannot be reversed")
            siblings = db.execute_sql(
                "SELECT id, account_id, direction FROM transactions WHERE movement_id = ?",
                (e_movement,)).fetchall()
            others = [s for s in siblings if s[0] != e_id and s[2] != e_direction]
            if len(siblings) != 2 or len(others) != 1:
                raise errors.ReversalNotAllowed("only a two-entry movement can be reversed")
            o_id, o_account, _ = others[0]
            if db.execute_sql("SELECT 1 FROM transactions WHERE reverses_id IN (?, ?)",
                              (e_id, o_id)).fetchone():
                raise errors.ReversalNotAllowed("already reversed")
            if e_direction == "inbound":
                debit_id, credit_id, reverses = e_account, o_account, (e_id, o_id)
            else:
                debit_id, credit_id, reverses = o_account, e_account, (o_id, e_id)
            debit, credit = self._lock_pair(uuid.UUID(debit_id), uuid.UUID(credit_id), amount,
                                            currency, allow_frozen=True)
            return self._apply_pair(movement_id, debit, credit, amount, "reversal", "reversal",
                                    description, transfer_id=_opt(tr), p2p_id=_opt(p2p),
                                    reverses=reverses, card_id=_opt(card))

    def card_payment(self, movement_id, user_id, card_id, amount, currency, merchant_name,
                     merchant_category, channel, international, description):
        with db.atomic():
            card = db.execute_sql(
                "SELECT user_id, account_id, status, expiry_year, expiry_month, online_enabled, "
                "contactless_enabled, international_enabled, daily_limit, monthly_limit "
                "FROM cards WHERE id = ?", (card_id.hex,)).fetchone()
            if card is None or card[0] != user_id.hex:
                raise errors.NotFound("card not found")
            (_, account_hex, status, exp_year, exp_month, online, contactless, abroad,
             daily_limit, monthly_limit) = card
            if status != "active":
                raise errors.CardNotActive(f"card is {status}")
            now = datetime.now(timezone.utc)
            if (now.year, now.month) > (exp_year, exp_month):
                raise errors.CardExpired("card expired")
            if international and not abroad:
                raise errors.ChannelDisabled("international payments are disabled on this card")
            if (channel == "online" and not online) or (channel == "contactless"
                                                         and not contactless):
                raise errors.ChannelDisabled(f"{channel} payments are disabled on this card")
            day_start = now.strftime("%Y-%m-%d 00:00:00")
            month_start = now.strftime("%Y-%m-01 00:00:00")
            spent_day, spent_month = db.execute_sql(
                "SELECT COALESCE(SUM(CASE WHEN created_at >= ? THEN "
                "CASE direction WHEN 'outbound' THEN amount ELSE -amount END END), 0), "
                "COALESCE(SUM(CASE direction WHEN 'outbound' THEN amount ELSE -amount END), 0) "
                "FROM transactions WHERE card_id = ? AND account_id = ? AND created_at >= ?",
                (day_start, card_id.hex, account_hex, month_start)).fetchone()
            if spent_day + amount > daily_limit:
                raise errors.DailyLimitExceeded("daily limit exceeded")
            if spent_month + amount > monthly_limit:
                raise errors.MonthlyLimitExceeded("monthly limit exceeded")
            account_id = uuid.UUID(account_hex)
            settlement = self.settlement_account(self._account(account_id).currency)
            debit, credit = self._lock_pair(account_id, settlement, amount, currency)
            return self._apply_pair(movement_id, debit, credit, amount, "payment", "settlement",
                                    description, card_id=card_id,
                                    merchant=(merchant_name, merchant_category))

    def card_refund(self, movement_id, user_id, payment_id, amount, description):
        with db.atomic():
            payment = db.execute_sql(
                "SELECT t.account_id, t.amount, t.currency, t.card_id, t.merchant_name, "
                "t.merchant_category, c.user_id FROM transactions t "
                "JOIN cards c ON c.id = t.card_id WHERE t.id = ? AND t.type = 'payment'",
                (payment_id.hex,)).fetchone()
            if payment is None or payment[6] != user_id.hex:
                raise errors.NotFound("payment not found")
            account_hex, paid, currency, card_hex, m_name, m_category, _ = payment
            refunded = db.execute_sql(
                "SELECT COALESCE(SUM(amount), 0) FROM transactions "
                "WHERE refund_of_id = ? AND type = 'refund'", (payment_id.hex,)).fetchone()[0]
            if refunded + amount > paid:
                raise errors.RefundExceedsPayment(
                    f"refunds would exceed the payment ({paid - refunded} minor units left "
                    "to refund)")
            settlement = self.settlement_account(currency)
            debit, credit = self._lock_pair(settlement, uuid.UUID(account_hex), amount, currency,
                                            allow_frozen=True)
            return self._apply_pair(movement_id, debit, credit, amount, "settlement", "refund",
                                    description, card_id=uuid.UUID(card_hex),
                                    merchant=(m_name, m_category), refund_of=payment_id)

    def trade(self, movement_id, user_id, account_id, symbol, quantity, is_buy):
        with db.atomic():
            acc = self._account(account_id)
            if acc is None or acc.user_id != user_id.hex:
                raise errors.NotFound("account not found")
            if acc.type != "investment":
                raise errors.NotInvestmentAccount("not an investment account")
            price_row = db.execute_sql(
                "SELECT name, type, currency, price FROM instrument_prices WHERE symbol = ?",
                (symbol,)).fetchone()
            if price_row is None:
                raise errors.NotFound(f"unknown symbol {symbol}")
            name, kind, price_currency, price = price_row
            price = Decimal(str(price))
            if price_currency != acc.currency:
                raise errors.CurrencyMismatch(
                    f"currency mismatch: {symbol} trades in {price_currency}")
            cash = round_to_minor(quantity * price, acc.currency)
            if cash > _BIGINT_MAX:
                # What PostgreSQL's cast of the cash leg refuses (22003), refused alike.
                raise errors.AmountError("the amount is too large")
            if cash <= 0:
                raise errors.OrderTooSmall("order is worth less than one minor unit")
            settlement = self.settlement_account(acc.currency)
            holding = db.execute_sql(
                "SELECT id, quantity, cost_basis FROM investments "
                "WHERE account_id = ? AND symbol = ?", (account_id.hex, symbol)).fetchone()
            stamp = _text(datetime.now(timezone.utc))
            if is_buy:
                debit, credit = self._lock_pair(account_id, settlement, cash, acc.currency)
                posting = self._apply_pair(movement_id, debit, credit, cash, "investment_buy",
                                           "settlement", f"Buy {quantity} {symbol}")
                if holding is None:
                    holding_id, held, basis = uuid.uuid4(), quantity, cash
                    db.execute_sql(
                        "INSERT INTO investments (id, user_id, account_id, symbol, name, type, "
                        "quantity, cost_basis, current_price, currency, purchase_date, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (holding_id.hex, user_id.hex, account_id.hex, symbol, name, kind,
                         str(held), basis, str(price), acc.currency, stamp, stamp, stamp))
                else:
                    holding_id = uuid.UUID(holding[0])
                    held = Decimal(str(holding[1])) + quantity
                    basis = holding[2] + cash
            else:
                held_now = Decimal(str(holding[1])) if holding else Decimal(0)
                if holding is None or held_now < quantity:
                    raise errors.InsufficientHolding(
                        f"holding {held_now} {symbol}, cannot sell {quantity}")
                debit, credit = self._lock_pair(settlement, account_id, cash, acc.currency)
                posting = self._apply_pair(movement_id, debit, credit, cash, "settlement",
                                           "investment_sell", f"Sell {quantity} {symbol}")
                holding_id, held = uuid.UUID(holding[0]), held_now - quantity
                basis_out = holding[2] if held == 0 else int(
                    (Decimal(holding[2]) * quantity / held_now)
                    .to_integral_value(rounding=ROUND_HALF_EVEN))
                basis = holding[2] - basis_out
            if holding is not None:
                db.execute_sql(
                    "UPDATE investments SET quantity = ?, cost_basis = ?, current_price = ?, "
                    "updated_at = ? WHERE id = ?",
                    (str(held), basis, str(price), stamp, holding_id.hex))
            return Trade(posting, holding_id, symbol, quantity, price, cash, held, basis)


def _opt(hex_or_none):
    return None if hex_or_none is None else uuid.UUID(hex_or_none)


def _text(moment):
    """SQLite's one timestamp shape (see hoardrun.db.UTCDateTimeField)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


_POSTGRES = _PostgresLedger()
_SQLITE = _SqliteLedger()
