"""Reading the books: account history, transfers, P2P payments and statements.

Every query is scoped to the calling user: a row that exists but is not
theirs is NotFound, exactly like a row that does not exist. Lists are
keyset-paginated newest first on ``(created_at, id)`` (one indexed range
scan per page, no OFFSET), and each page is ONE statement that joins what
it shows, so the number of queries does not grow with the page size.

Cursors are signed and bound to their list and filters (``hoardrun.cursors``).

The statement is computed in SQL (one GROUP BY over the account's entries
before the period's end) so it is always consistent with the entries a
list with the same period shows: opening = signed sum of the entries before
``start``, totals by type of those in ``[start, end)``, closing = opening +
in - out.
"""

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import errors
from .cursors import check_limit, encode_cursor, keyset, page_of
from .db import db, to_utc
from .ids import as_uuid, parse_id
from .models import DIRECTIONS, ENTRY_STATUSES, ENTRY_TYPES, MOVEMENT_STATUSES, Transaction
from .money import parse_amount

Q_MAX_LENGTH = 100


# --------------------------------------------------------------------------
# What the lists return (amounts in minor units; the API formats them)

@dataclass(frozen=True)
class Counterparty:
    """The other side of an entry: one of my accounts, another user, or the outside world."""

    kind: str  # "account" | "user" | "external"
    account_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    name: str | None = None


@dataclass(frozen=True)
class Entry:
    """One ledger entry on one of my accounts."""

    id: uuid.UUID
    account_id: uuid.UUID
    movement_id: uuid.UUID
    type: str
    direction: str
    amount: int
    currency: str
    balance_after: int
    description: str | None
    merchant_name: str | None
    merchant_category: str | None
    reference: str
    status: str
    created_at: datetime
    transfer_id: uuid.UUID | None
    p2p_id: uuid.UUID | None
    reverses_id: uuid.UUID | None
    counterparty: Counterparty | None


@dataclass(frozen=True)
class Reversal:
    """The movement that undid a transfer or P2P payment, seen from my side."""

    movement_id: uuid.UUID
    entry_id: uuid.UUID  # the reversing entry on my account (GET /transactions/{id})
    reversed_at: datetime


@dataclass(frozen=True)
class TransferRecord:
    """A transfer between two of my accounts."""

    id: uuid.UUID
    reference: str
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID
    amount: int
    currency: str
    fee: int
    description: str | None
    status: str
    created_at: datetime
    completed_at: datetime | None
    reversal: Reversal | None = None  # set when status is "reversed"


@dataclass(frozen=True)
class Payment:
    """A P2P payment I sent or received, seen from my side."""

    id: uuid.UUID
    reference: str
    direction: str  # "sent" | "received"
    account_id: uuid.UUID  # my account on this payment
    counterparty: Counterparty
    amount: int
    currency: str
    note: str | None
    status: str
    created_at: datetime
    completed_at: datetime | None
    reversal: Reversal | None = None  # set when status is "reversed"


@dataclass(frozen=True)
class TypeTotal:
    type: str
    direction: str
    count: int
    amount: int


@dataclass(frozen=True)
class Statement:
    """An account's movements over ``[start, end)``, aggregated in SQL."""

    account_id: uuid.UUID
    currency: str
    start: datetime
    end: datetime
    opening_balance: int
    total_in: int
    total_out: int
    closing_balance: int
    entry_count: int
    by_type: list = field(default_factory=list)


# --------------------------------------------------------------------------
# SQL helpers


def _hex(value):
    return as_uuid(value).hex


def _uuid(value):
    return None if value is None else as_uuid(value)


def _as_uuid(value, field_name):
    return parse_id(value, field=field_name)


def _ts(value):
    """A timestamp parameter in the column's own form (refuses naive datetimes)."""
    return Transaction.created_at.db_value(value)


def _utc(value, field_name):
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise errors.ValidationError(f"{field_name} must be an ISO 8601 timestamp",
                                     field=field_name)
    # A timestamp without an offset is read as UTC (documented in the API).
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(
        timezone.utc)


def _choice(value, allowed, field_name):
    if value is not None and value not in allowed:
        raise errors.ValidationError(f"{field_name} must be one of {', '.join(allowed)}",
                                     field=field_name)
    return value


def _like_pattern(text):
    """``%text%`` for LIKE … ESCAPE '\\', the user's own wildcards made literal."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# --------------------------------------------------------------------------
# Entries

_ENTRY_SELECT = (
    "SELECT t.id, t.account_id, t.movement_id, t.type, t.direction, t.amount, t.currency, "
    "t.balance_after, t.description, t.merchant_name, t.merchant_category, t.reference, "
    "t.status, t.created_at, t.transfer_id, t.p2p_id, t.reverses_id, "
    "o.account_id, oa.type, oa.user_id, oa.name, ou.first_name, ou.last_name "
    "FROM transactions t "
    # The other side of the movement, its account and owner, in the same
    # statement: a page costs one query whatever its size.
    "LEFT JOIN transactions o ON o.movement_id = t.movement_id AND o.id <> t.id "
    "AND o.direction <> t.direction "
    "LEFT JOIN accounts oa ON oa.id = o.account_id "
    "LEFT JOIN users ou ON ou.id = oa.user_id ")


def display_name(first_name, last_name):
    """How another user is shown to me: first name and last initial."""
    if not first_name:
        return None
    return f"{first_name} {last_name[:1]}." if last_name else first_name


def _counterparty(me, account_id, account_type, owner_id, account_name, first, last):
    if account_id is None:
        return None
    if account_type == "settlement":
        return Counterparty("external")
    owner = _uuid(owner_id)
    if owner == me:
        return Counterparty("account", account_id=_uuid(account_id), name=account_name)
    # Another user's account id and name are theirs, not mine to see.
    return Counterparty("user", user_id=owner, name=display_name(first, last))


def _entry(me):
    def make(row):
        return Entry(
            id=_uuid(row[0]), account_id=_uuid(row[1]), movement_id=_uuid(row[2]), type=row[3],
            direction=row[4], amount=int(row[5]), currency=row[6], balance_after=int(row[7]),
            description=row[8], merchant_name=row[9], merchant_category=row[10],
            reference=row[11], status=row[12], created_at=to_utc(row[13]),
            transfer_id=_uuid(row[14]), p2p_id=_uuid(row[15]), reverses_id=_uuid(row[16]),
            counterparty=_counterparty(me, *row[17:23]))
    return make


def _owned_account(user_id, account_id):
    """``(id, currency)`` of the user's account, or NotFound."""
    account_id = _as_uuid(account_id, "account_id")
    row = db.execute_sql(
        "SELECT id, currency FROM accounts WHERE id = %s AND user_id = %s "
            "AND type <> 'settlement'",
        (account_id.hex, _hex(user_id))).fetchone()
    if row is None:
        raise errors.NotFound("account not found", field="account_id")
    return account_id, row[1]


def _entry_filters(*, type=None, direction=None, status=None, start=None, end=None, low=None,
                   high=None, merchant_category=None, q=None):
    """What an entries cursor is bound to: the filters of the list it came from."""
    return {"type": type, "direction": direction, "status": status,
            "from": start and start.isoformat(), "to": end and end.isoformat(),
            "min": low, "max": high, "merchant_category": merchant_category, "q": q}


def _entries_scope(account_id):
    return f"entries:{account_id}"


def entries_cursor(secret, account_id, created_raw, entry_id):
    """The cursor of the unfiltered history of ``account_id`` after one entry.

    Operators' tools (the bench's deep pages) use it to start deep in a long
    history without paging there; clients only ever get cursors from pages.
    """
    return encode_cursor(secret, _entries_scope(as_uuid(account_id)), _entry_filters(),
                         created_raw, as_uuid(entry_id))


def account_entries(user_id, account_id, *, secret, limit=None, cursor=None, type=None,
                    direction=None, status=None, start=None, end=None, min_amount=None,
                    max_amount=None, merchant_category=None, q=None):
    """A page of the entries on one of my accounts, newest first.

    Filters: ``type``, ``direction``, ``status`` (exact), ``start`` ≤
    created_at < ``end`` (aware datetimes; naive ones are UTC),
    ``min_amount`` ≤ amount ≤ ``max_amount`` (decimal strings in the
    account's currency), ``merchant_category`` (exact) and ``q`` (text in
    the description, case-insensitive, wildcards taken literally).
    """
    limit = check_limit(limit)
    me = as_uuid(user_id)
    account_id, currency = _owned_account(me, account_id)
    _choice(type, ENTRY_TYPES, "type")
    _choice(direction, DIRECTIONS, "direction")
    _choice(status, ENTRY_STATUSES, "status")
    start, end = _utc(start, "from"), _utc(end, "to")
    if start and end and start >= end:
        raise errors.ValidationError("from must be before to", field="from")
    low = None if min_amount is None else parse_amount(min_amount, currency, field="min_amount",
                                                       allow_zero=True)
    high = None if max_amount is None else parse_amount(max_amount, currency,
                                                        field="max_amount", allow_zero=True)
    if low is not None and high is not None and low > high:
        raise errors.ValidationError("min_amount must not exceed max_amount", field="min_amount")
    if q is not None and (not isinstance(q, str) or len(q) > Q_MAX_LENGTH):
        raise errors.ValidationError(f"q must be at most {Q_MAX_LENGTH} characters", field="q")

    conditions, params = ["t.account_id = %s"], [account_id.hex]
    for column, value in (("type", type), ("direction", direction), ("status", status),
                          ("merchant_category", merchant_category)):
        if value is not None:
            conditions.append(f"t.{column} = %s")
            params.append(value)
    if start is not None:
        conditions.append("t.created_at >= %s")
        params.append(_ts(start))
    if end is not None:
        conditions.append("t.created_at < %s")
        params.append(_ts(end))
    if low is not None:
        conditions.append("t.amount >= %s")
        params.append(low)
    if high is not None:
        conditions.append("t.amount <= %s")
        params.append(high)
    if q:
        conditions.append("lower(t.description) LIKE %s ESCAPE '\\'")
        params.append(_like_pattern(q))
    filters = _entry_filters(type=type, direction=direction, status=status, start=start,
                             end=end, low=low, high=high, merchant_category=merchant_category,
                             q=q)
    scope = _entries_scope(account_id)
    keyset(conditions, params, "t", secret, scope, filters, cursor)
    rows = db.execute_sql(
        _ENTRY_SELECT + "WHERE " + " AND ".join(conditions)
            + " ORDER BY t.created_at DESC, t.id DESC LIMIT %s",
        (*params, limit + 1)).fetchall()
    return page_of(rows, limit, _entry(me), secret, scope, filters, created_index=13)


def entry(user_id, entry_id):
    """One entry on one of my accounts, or NotFound."""
    me = as_uuid(user_id)
    entry_id = _as_uuid(entry_id, "transaction_id")
    row = db.execute_sql(
        _ENTRY_SELECT + "JOIN accounts a ON a.id = t.account_id "
            "WHERE t.id = %s AND a.user_id = %s",
        (entry_id.hex, me.hex)).fetchone()
    if row is None:
        raise errors.NotFound("transaction not found")
    return _entry(me)(row)


# --------------------------------------------------------------------------
# Transfers

_TRANSFER_SELECT = (
    "SELECT m.id, m.reference, m.from_account_id, m.to_account_id, m.amount, m.currency, "
    "m.fee, m.description, m.status, m.created_at, m.completed_at, "
    "m.reversal_id, rv.id, rv.created_at FROM transfers m "
    # The reversing entry on the account the money left (where it came back).
    "LEFT JOIN transactions rv ON rv.movement_id = m.reversal_id "
    "AND rv.account_id = m.from_account_id ")


def _reversal(movement_id, entry_id, reversed_at):
    if movement_id is None:
        return None
    return Reversal(movement_id=_uuid(movement_id), entry_id=_uuid(entry_id),
                    reversed_at=to_utc(reversed_at))


def _transfer(row):
    return TransferRecord(
        id=_uuid(row[0]), reference=row[1], from_account_id=_uuid(row[2]),
        to_account_id=_uuid(row[3]), amount=int(row[4]), currency=row[5], fee=int(row[6]),
        description=row[7], status=row[8], created_at=to_utc(row[9]),
        completed_at=to_utc(row[10]), reversal=_reversal(*row[11:14]))


def transfers(user_id, *, secret, limit=None, cursor=None, account_id=None, status=None):
    """A page of my transfers, newest first; optionally those touching ``account_id``."""
    limit = check_limit(limit)
    me = as_uuid(user_id)
    _choice(status, MOVEMENT_STATUSES, "status")
    conditions, params = ["m.user_id = %s"], [me.hex]
    if account_id is not None:
        account = _as_uuid(account_id, "account_id").hex
        conditions.append("(m.from_account_id = %s OR m.to_account_id = %s)")
        params.extend([account, account])
    if status is not None:
        conditions.append("m.status = %s")
        params.append(status)
    filters = {"account_id": account_id and str(account_id), "status": status}
    keyset(conditions, params, "m", secret, "transfers", filters, cursor)
    rows = db.execute_sql(
        _TRANSFER_SELECT + "WHERE " + " AND ".join(conditions)
            + " ORDER BY m.created_at DESC, m.id DESC LIMIT %s",
        (*params, limit + 1)).fetchall()
    return page_of(rows, limit, _transfer, secret, "transfers", filters, created_index=9)


def transfer(user_id, transfer_id):
    """One of my transfers, or NotFound."""
    transfer_id = _as_uuid(transfer_id, "transfer_id")
    row = db.execute_sql(_TRANSFER_SELECT + "WHERE m.id = %s AND m.user_id = %s",
                         (transfer_id.hex, _hex(user_id))).fetchone()
    if row is None:
        raise errors.NotFound("transfer not found")
    return _transfer(row)


# --------------------------------------------------------------------------
# P2P payments

_P2P_SELECT = (
    "SELECT p.id, p.reference, p.sender_id, p.recipient_id, p.sender_account_id, "
    "p.recipient_account_id, p.amount, p.currency, p.note, p.status, p.created_at, "
    "p.completed_at, s.first_name, s.last_name, r.first_name, r.last_name, "
    "p.reversal_id, rs.id, rs.created_at, rr.id, rr.created_at "
    "FROM p2p_transactions p "
    "JOIN users s ON s.id = p.sender_id "
    "JOIN users r ON r.id = p.recipient_id "
    # The reversing entries on each side: each user is shown their own.
    "LEFT JOIN transactions rs ON rs.movement_id = p.reversal_id "
    "AND rs.account_id = p.sender_account_id "
    "LEFT JOIN transactions rr ON rr.movement_id = p.reversal_id "
    "AND rr.account_id = p.recipient_account_id ")


def _payment(me):
    def make(row):
        sent = _uuid(row[2]) == me
        if sent:
            other = Counterparty("user", user_id=_uuid(row[3]),
                                 name=display_name(row[14], row[15]))
        else:
            other = Counterparty("user", user_id=_uuid(row[2]),
                                 name=display_name(row[12], row[13]))
        return Payment(
            id=_uuid(row[0]), reference=row[1], direction="sent" if sent else "received",
            # Only my own account on the payment, never the other user's.
            account_id=_uuid(row[4] if sent else row[5]), counterparty=other,
            amount=int(row[6]), currency=row[7], note=row[8], status=row[9],
            created_at=to_utc(row[10]), completed_at=to_utc(row[11]),
            reversal=_reversal(row[16], *(row[17:19] if sent else row[19:21])))
    return make


def payments(user_id, *, secret, limit=None, cursor=None, direction=None, status=None):
    """A page of P2P payments I sent or received, newest first.

    ``direction`` is ``sent`` or ``received`` (default both).
    """
    limit = check_limit(limit)
    me = as_uuid(user_id)
    _choice(direction, ("sent", "received"), "direction")
    _choice(status, MOVEMENT_STATUSES, "status")
    if direction == "sent":
        conditions, params = ["p.sender_id = %s"], [me.hex]
    elif direction == "received":
        conditions, params = ["p.recipient_id = %s"], [me.hex]
    else:
        conditions, params = ["(p.sender_id = %s OR p.recipient_id = %s)"], [me.hex, me.hex]
    if status is not None:
        conditions.append("p.status = %s")
        params.append(status)
    filters = {"direction": direction, "status": status}
    keyset(conditions, params, "p", secret, "p2p", filters, cursor)
    rows = db.execute_sql(
        _P2P_SELECT + "WHERE " + " AND ".join(conditions)
            + " ORDER BY p.created_at DESC, p.id DESC LIMIT %s",
        (*params, limit + 1)).fetchall()
    return page_of(rows, limit, _payment(me), secret, "p2p", filters, created_index=10)


def payment(user_id, payment_id):
    """One P2P payment I sent or received, or NotFound."""
    me = as_uuid(user_id)
    payment_id = _as_uuid(payment_id, "payment_id")
    row = db.execute_sql(
        _P2P_SELECT + "WHERE p.id = %s AND (p.sender_id = %s OR p.recipient_id = %s)",
        (payment_id.hex, me.hex, me.hex)).fetchone()
    if row is None:
        raise errors.NotFound("payment not found")
    return _payment(me)(row)


# --------------------------------------------------------------------------
# Statements

def statement(user_id, account_id, *, start, end):
    """Opening balance, totals in/out by type, closing balance and count over ``[start, end)``.

    One aggregate statement: entries before ``start`` fold into the opening
    balance, the rest are grouped by type and direction.
    """
    start, end = _utc(start, "from"), _utc(end, "to")
    if start is None or end is None:
        raise errors.ValidationError("from and to are required", field="from" if start is None
                                     else "to")
    if start >= end:
        raise errors.ValidationError("from must be before to", field="from")
    account_id, currency = _owned_account(user_id, account_id)
    # '' can never be an entry type, so it marks "before the period".
    rows = db.execute_sql(
        "SELECT e.bucket, e.direction, COUNT(*), SUM(e.amount) FROM ("
            "SELECT CASE WHEN created_at < %s THEN '' ELSE type END AS bucket, direction, amount "
            "FROM transactions WHERE account_id = %s AND created_at < %s) e "
            "GROUP BY e.bucket, e.direction ORDER BY e.bucket, e.direction",
        (_ts(start), account_id.hex, _ts(end))).fetchall()
    opening = total_in = total_out = count = 0
    by_type = []
    for bucket, direction, n, amount in rows:
        amount = int(amount)
        signed = amount if direction == "inbound" else -amount
        if bucket == "":
            opening += signed
            continue
        by_type.append(TypeTotal(bucket, direction, int(n), amount))
        count += int(n)
        if direction == "inbound":
            total_in += amount
        else:
            total_out += amount
    return Statement(account_id=account_id, currency=currency, start=start, end=end,
                     opening_balance=opening, total_in=total_in, total_out=total_out,
                     closing_balance=opening + total_in - total_out, entry_count=count,
                     by_type=by_type)


# --------------------------------------------------------------------------
# Balance as of a moment


@dataclass(frozen=True)
class BalanceAt:
    """An account's balance at ``as_of``: the ``balance_after`` of its last entry then."""

    account_id: uuid.UUID
    currency: str
    as_of: datetime
    balance: int
    held: int
    entry_id: uuid.UUID | None
    entry_at: datetime | None


def balance_at(user_id, account_id, as_of, *, now):
    """My account's balance (and what card holds reserved) at the instant ``as_of``.

    One backward seek of the (account_id, created_at, id) index for the last
    entry at or before ``as_of``, never a sum of history; before the first
    entry the balance is zero. Holds active then (authorized at or before,
    not yet resolved or expired) are summed over at most the 30 days a hold
    can live. ``as_of`` after ``now`` is refused: that balance is not known
    yet. NOTE: an instant within the last moments may still gain an entry
    whose transaction has not committed yet.
    """
    as_of, now = _utc(as_of, "as_of"), _utc(now, "now")
    if as_of is None:
        raise errors.ValidationError("as_of is required", field="as_of")
    if as_of > now:
        raise errors.ValidationError("as_of is in the future: a balance is only known up to "
                                     "now", field="as_of")
    account_id = _as_uuid(account_id, "account_id")
    at = _ts(as_of)
    row = db.execute_sql(
        "SELECT a.currency, t.balance_after, t.id, t.created_at, "
        "(SELECT COALESCE(SUM(h.amount), 0) FROM card_holds h WHERE h.account_id = a.id "
        "AND h.created_at <= %s AND h.created_at > %s - interval '30 days' "
        "AND h.expires_at > %s AND (h.resolved_at IS NULL OR h.resolved_at > %s)) "
        "FROM accounts a LEFT JOIN LATERAL (SELECT e.balance_after, e.id, e.created_at "
        "FROM transactions e WHERE e.account_id = a.id AND e.created_at <= %s "
        "ORDER BY e.created_at DESC, e.id DESC LIMIT 1) t ON TRUE "
        "WHERE a.id = %s AND a.user_id = %s AND a.type <> 'settlement'",
        (at, at, at, at, at, account_id.hex, _hex(user_id))).fetchone()
    if row is None:
        raise errors.NotFound("account not found", field="account_id")
    currency, balance, entry_id, entry_at, held = row
    return BalanceAt(account_id=account_id, currency=currency, as_of=as_of,
                     balance=0 if balance is None else int(balance), held=int(held),
                     entry_id=_uuid(entry_id), entry_at=to_utc(entry_at))
