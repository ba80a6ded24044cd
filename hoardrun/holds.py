"""Card authorizations (holds): authorize, capture once, void, expire.

An authorization runs every check of a card payment (card status and
expiry, channel, daily and monthly limits, funds) and reserves the money on
the card's account without moving it: the account's *available* balance
drops, its balance does not. It ends exactly once: captured (for at most
what it holds, once; the rest is released, and the capture is a card
payment, refundable and reversible like one), voided, or expired. Expiry is
set at authorization (7 days by default, at most 30); a hold past it stops
counting at once, and ``invoke ledger.expire-holds`` only records it.

Every rule is in the ledger functions (migration 008). Times here are the
app's clock (``now``, which the API takes from ``create_app(clock=...)``);
ledger entries are stamped by the database's clock.
"""

import contextlib
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta

from . import audit, errors, ledger
from .cards import merchant_details
from .clock import utcnow
from .db import db
from .ids import as_uuid, parse_id
from .money import format_amount, parse_amount

DEFAULT_EXPIRY_DAYS = ledger.HOLD_DEFAULT_EXPIRY.days
MAX_EXPIRY_DAYS = ledger.HOLD_MAX_EXPIRY.days


@dataclass(frozen=True)
class Authorization:
    """A hold as a user sees it at ``now``; ``payment`` is set once it was captured."""

    hold: ledger.Hold
    status: str
    payment_id: uuid.UUID | None = None
    balance_after: int | None = None

    @property
    def released(self):
        """What the hold gave back: all of it unless captured, else the uncaptured rest."""
        if self.status == "active":
            return None
        return self.hold.amount - (self.hold.captured_amount or 0)


def effective_status(hold, now):
    """``expired`` for an active hold past its expiry, swept or not; else its status."""
    if hold.status == "active" and hold.expires_at <= now:
        return "expired"
    return hold.status


def _transaction():
    # Inside the idempotency transaction one more savepoint only costs a round trip.
    return contextlib.nullcontext() if db.in_transaction() else db.atomic()


def _now(now):
    return utcnow() if now is None else now


def _id(value, field):
    return parse_id(value, "authorization", field=field)


def authorize(user_id, card_id, *, amount, currency, merchant_name, merchant_category, channel,
              international=False, description=None, expires_in_days=None, now=None,
              request_id=None):
    """Hold ``amount`` (decimal string in ``currency``) on the card's account.

    Refused (422, nothing written) exactly as a card payment would be; the
    hold counts against the card's limits while it is active.
    """
    now = _now(now)
    minor = parse_amount(amount, currency)
    merchant_name, merchant_category, description = merchant_details(
        channel, merchant_name, merchant_category, description)
    days = DEFAULT_EXPIRY_DAYS if expires_in_days is None else expires_in_days
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_EXPIRY_DAYS:
        raise errors.ValidationError(
            f"expires_in_days must be a whole number of days from 1 to {MAX_EXPIRY_DAYS}",
            field="expires_in_days")
    user_id = _id(user_id, "user_id")
    with _transaction():
        hold = ledger.authorize(user_id, _id(card_id, "card_id"), minor,
                                merchant_name=merchant_name,
                                merchant_category=merchant_category, channel=channel,
                                international=bool(international), currency=currency,
                                description=description, expires_in=timedelta(days=days),
                                now=now)
        audit.record("card.authorize", "card_hold", hold.id, actor_id=user_id, after={
            "card_id": hold.card_id, "amount": hold.amount, "currency": hold.currency,
            "merchant_name": merchant_name, "merchant_category": merchant_category,
            "channel": channel, "expires_at": hold.expires_at.isoformat()},
            request_id=request_id)
    return Authorization(hold, effective_status(hold, now))


_MINOR_UNITS_HELD = re.compile(r"(\d+) minor units held")


def capture(user_id, hold_id, *, amount=None, now=None, request_id=None):
    """Capture my active authorization for ``amount`` (default: all) ≤ what it holds.

    Once: a second capture, or a capture after a void or expiry, is a 409.
    """
    now = _now(now)
    user_id, hold_id = _id(user_id, "user_id"), _id(hold_id, "authorization_id")
    with _transaction():
        currency = _currency(user_id, hold_id)
        minor = None if amount is None else parse_amount(amount, currency)
        try:
            hold, posting = ledger.capture(user_id, hold_id, minor, now=now)
        except errors.CaptureExceedsAuthorization as exc:
            detail = _MINOR_UNITS_HELD.sub(
                lambda m: f"{format_amount(int(m.group(1)), currency)} {currency} held",
                exc.detail)
            raise errors.CaptureExceedsAuthorization(detail, field="amount") from None
        audit.record("card.capture", "card_hold", hold.id, actor_id=user_id, after={
            "card_id": hold.card_id, "captured_amount": hold.captured_amount,
            "released_amount": hold.amount - hold.captured_amount, "currency": hold.currency,
            "entry_id": posting.debit.entry_id}, request_id=request_id)
    return Authorization(hold, hold.status, payment_id=posting.debit.entry_id,
                         balance_after=posting.debit.balance_after)


def void(user_id, hold_id, *, now=None, request_id=None):
    """Release my active authorization in full; nothing moves. Once, like a capture."""
    now = _now(now)
    user_id, hold_id = _id(user_id, "user_id"), _id(hold_id, "authorization_id")
    with _transaction():
        hold = ledger.void(user_id, hold_id, now=now)
        audit.record("card.void", "card_hold", hold.id, actor_id=user_id, after={
            "card_id": hold.card_id, "released_amount": hold.amount,
            "currency": hold.currency}, request_id=request_id)
    return Authorization(hold, hold.status)


def get(user_id, hold_id, *, now=None):
    """My authorization ``hold_id`` as it stands at ``now``; NotFound for anyone else's."""
    now = _now(now)
    columns = ", ".join("h." + c for c in ledger.HOLD_COLUMNS)
    row = db.execute_sql(
        f"SELECT {columns}, t.id, t.balance_after FROM card_holds h "
        "LEFT JOIN transactions t ON t.movement_id = h.capture_movement_id "
        "AND t.direction = 'outbound' WHERE h.id = %s AND h.user_id = %s",
        (_id(hold_id, "authorization_id").hex, _id(user_id, "user_id").hex)).fetchone()
    if row is None:
        raise errors.NotFound("authorization not found")
    hold = ledger.hold_from_row(row[:len(ledger.HOLD_COLUMNS)])
    entry, balance_after = row[len(ledger.HOLD_COLUMNS):]
    return Authorization(hold, effective_status(hold, now),
                         payment_id=None if entry is None else as_uuid(entry),
                         balance_after=None if balance_after is None else int(balance_after))


def expire(now=None):
    """Record every hold past its expiry as expired (``invoke ledger.expire-holds``)."""
    return ledger.expire_holds(_now(now))


def _currency(user_id, hold_id):
    row = db.execute_sql("SELECT currency FROM card_holds WHERE id = %s AND user_id = %s",
                         (hold_id.hex, user_id.hex)).fetchone()
    if row is None:
        raise errors.NotFound("authorization not found")
    return row[0]
