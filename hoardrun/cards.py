"""Payment cards: issue, read (masked), freeze, limits, channel controls, cancel, pay, refund.

The full card number exists in clear exactly twice: in memory while a card
is issued (returned once, in ``IssuedCard``) and in memory while keys are
rotated. It is stored only encrypted (``security.CardCipher``), found again
only through its keyed fingerprint, and shown otherwise as last four digits
and a mask. No CVV is generated or stored: a sandbox issuer has no use for
one, and PCI DSS forbids keeping it after authorisation anyway.

Every state change is one database transaction that also appends its audit
row, so either both land or neither does. Payments and refunds go through
``ledger.card_payment`` / ``ledger.card_refund``, which lock the card row and
check status, expiry, channel and limits under that lock.
"""

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import peewee as pw

from . import audit, errors, ledger
from .cursors import page_query
from .clock import utcnow
from .db import db
from .ids import parse_id
from .models import Account, Card, Transaction
from .money import format_amount, get_currency, parse_amount
from .security import CardCipher, fingerprint, generate_card_number, mask_card_number
from .text import clean_text

#: Card types a customer can be issued (credit cards need an underwriting
#: flow HoardRun does not have).
ISSUABLE_TYPES = ("debit", "prepaid")
#: Account types a card can draw on.
CARD_ACCOUNT_TYPES = ("checking", "savings", "business")
#: Payment channels; chip (card present, inserted) cannot be switched off.
CHANNELS = ("online", "contactless", "chip")
#: A new card is valid through the end of this month, this many years ahead.
VALIDITY_YEARS = 3
#: A new card's daily limit in major units of its account's currency: about
#: 1,000 US dollars, rounded to a number people of that currency recognise
#: (1,000.00 USD, 150,000 JPY, 300.000 KWD). The same number in every
#: currency would be 1,000 yen (about 7 dollars) or 1,000 dinars (3,250).
DEFAULT_DAILY_LIMITS = {
    "AED": 4_000, "AUD": 1_500, "BHD": 400, "BRL": 5_000, "CAD": 1_500, "CHF": 1_000,
    "CLP": 1_000_000, "CNY": 7_000, "CZK": 25_000, "DKK": 7_000, "EUR": 1_000, "GBP": 1_000,
    "GHS": 15_000, "HKD": 8_000, "INR": 100_000, "ISK": 150_000, "JOD": 700, "JPY": 150_000,
    "KES": 150_000, "KRW": 1_500_000, "KWD": 300, "MXN": 20_000, "NGN": 1_500_000,
    "NOK": 10_000, "NZD": 1_500, "OMR": 400, "PLN": 4_000, "SEK": 10_000, "SGD": 1_500,
    "TND": 3_000, "USD": 1_000, "ZAR": 20_000,
}
#: For a currency added to money.CURRENCIES without an entry above: by its
#: exponent (no minor unit currencies are mostly worth far less per unit).
DEFAULT_DAILY_LIMIT_BY_EXPONENT = {0: 100_000, 2: 1_000, 3: 300}
#: The monthly default is this many daily limits.
MONTHLY_PER_DAILY = 5

_ISSUE_ATTEMPTS = 5
# Names as embossed: letters (any script), spaces and . ' - only. No digits,
# so a card number can never be smuggled into a stored name.
_NAME = re.compile(r"[^\W\d_]+(?:[ .'\-]+[^\W\d_]+)*\.?")


@dataclass(frozen=True)
class IssuedCard:
    """A newly issued card and its full number, to be shown once and then forgotten."""

    card: Card
    number: str = field(repr=False)


# --------------------------------------------------------------------------
# Expiry (month/year in UTC)

def expiry_for(now, years=VALIDITY_YEARS):
    """The (month, year) a card issued at ``now`` expires: same month, ``years`` ahead."""
    now = _utc(now)
    return now.month, now.year + years


def expires_at(month, year):
    """The first instant (UTC) a card printed ``month/year`` is no longer valid.

    A card is valid through the LAST day of its expiry month, so this is
    midnight at the start of the following month (January of the next year
    for a December expiry).
    """
    if month == 12:
        return datetime(year + 1, 1, 1, tzinfo=timezone.utc)
    return datetime(year, month + 1, 1, tzinfo=timezone.utc)


def is_expired(card, now=None):
    """True once ``now`` (UTC; default: the current time) is past the card's expiry month."""
    return _utc(now) >= expires_at(card.expiry_month, card.expiry_year)


def effective_status(card, now=None):
    """The status a user sees: ``expired`` once past expiry, unless cancelled."""
    if card.status != "cancelled" and is_expired(card, now):
        return "expired"
    return card.status


def _utc(now):
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("naive datetime: card expiry is computed in UTC")
    return now.astimezone(timezone.utc)


# --------------------------------------------------------------------------
# Reading

def get_card(user_id, card_id):
    """The card ``card_id`` if ``user_id`` holds it; NotFound otherwise (also for others' cards)."""
    card = (Card.select(Card, Account)
            .join(Account)
            .where((Card.id == _uuid(card_id)) & (Card.user == _uuid(user_id)))
            .first())
    if card is None:
        raise errors.NotFound("card not found")
    return card


def default_limits(currency):
    """A new card's ``(daily, monthly)`` limits in minor units of ``currency``."""
    cur = get_currency(currency)
    daily = DEFAULT_DAILY_LIMITS.get(cur.code) or DEFAULT_DAILY_LIMIT_BY_EXPONENT.get(
        cur.exponent, 1_000)
    return daily * cur.factor, daily * MONTHLY_PER_DAILY * cur.factor


def list_cards(user_id, *, secret, limit=None, cursor=None):
    """``user_id``'s cards, newest first: a ``cursors.Page``."""
    query = (Card.select(Card, Account)
             .join(Account)
             .where(Card.user == _uuid(user_id)))
    return page_query(query, Card, secret=secret, scope=f"cards:{_uuid(user_id)}",
                      limit=limit, cursor=cursor)


def card_state(card, now=None):
    """What the audit log and the API may show of a card: never the number."""
    return {
        "id": card.id,
        "account_id": card.account_id,
        "type": card.type,
        "status": effective_status(card, now),
        "cardholder_name": card.cardholder_name,
        "masked_number": card.masked_number,
        "last_four": card.last_four,
        "expiry_month": card.expiry_month,
        "expiry_year": card.expiry_year,
        "daily_limit": card.daily_limit,
        "monthly_limit": card.monthly_limit,
        # The account is joined by every reader here, so this costs no query.
        "currency": card.account.currency,
        "online_enabled": card.online_enabled,
        "contactless_enabled": card.contactless_enabled,
        "international_enabled": card.international_enabled,
    }


# --------------------------------------------------------------------------
# Issuing

def issue_card(user_id, account_id, type, cardholder_name, *, settings, now=None,
               request_id=None, cipher=None):
    """Issue a ``type`` card on ``user_id``'s account ``account_id``.

    Returns ``IssuedCard(card, number)``: the caller shows the number once.
    Only the encrypted number, its fingerprint, the last four digits and the
    mask are stored. Limits start at ``default_limits(currency)``.
    """
    if type not in ISSUABLE_TYPES:
        raise errors.ValidationError(f"type must be one of {', '.join(ISSUABLE_TYPES)}",
                                     field="type")
    name = _cardholder_name(cardholder_name)
    cipher = cipher or CardCipher.from_settings(settings)
    now = _utc(now)
    month, year = expiry_for(now)
    user_id = _uuid(user_id)
    with db.atomic():
        account = Account.get_or_none((Account.id == _uuid(account_id, "account_id"))
                                      & (Account.user == user_id))
        if account is None:
            raise errors.NotFound("account not found", field="account_id")
        if account.type not in CARD_ACCOUNT_TYPES:
            raise errors.ValidationError(
                f"cards can be issued on {', '.join(CARD_ACCOUNT_TYPES)} accounts, "
                f"not on a {account.type} account", field="account_id")
        if account.status != "active":
            raise errors.AccountNotActive(f"account is {account.status}", field="account_id")
        daily_limit, monthly_limit = default_limits(account.currency)
        for attempt in range(_ISSUE_ATTEMPTS):
            number = generate_card_number()
            try:
                with db.atomic():
                    card = Card.create(
                        user=user_id, account=account, type=type, status="active",
                        cardholder_name=name, number_encrypted=cipher.encrypt(number),
                        number_fingerprint=fingerprint(number, settings.secret_key),
                        last_four=number[-4:], masked_number=mask_card_number(number),
                        expiry_month=month, expiry_year=year,
                        daily_limit=daily_limit, monthly_limit=monthly_limit,
                        # Explicit, not the column default (the transaction's
                        # start), so cards list in the order they were issued.
                        created_at=now, updated_at=now)
                break
            except pw.IntegrityError as exc:
                # Only a clash of random numbers (one in ~10^9 per card) is
                # worth another try; the message names the column, never the number.
                if "fingerprint" not in str(exc) or attempt == _ISSUE_ATTEMPTS - 1:
                    raise
        card = Card.get_by_id(card.id)  # database defaults (created_at) filled in
        card.account = account
        audit.record("card.issue", "card", card.id, actor_id=user_id, after=card_state(card),
                     request_id=request_id)
    return IssuedCard(card, number)


def _cardholder_name(value):
    if not isinstance(value, str):
        raise errors.ValidationError("cardholder_name must be a string", field="cardholder_name")
    name = " ".join(value.split())
    if not 2 <= len(name) <= 26 or not _NAME.fullmatch(name):
        # 26: the embossing limit of ISO/IEC 7813 track 1.
        raise errors.ValidationError(
            "cardholder_name must be 2 to 26 letters, spaces, dots, apostrophes or hyphens",
            field="cardholder_name")
    return name


# --------------------------------------------------------------------------
# Changing a card

def freeze(user_id, card_id, *, request_id=None):
    """Block the card (payments refused) until it is unfrozen; freezing twice is a no-op."""
    def change(card):
        if card.status in ("active", "inactive"):
            card.status = "blocked"
    return _change(user_id, card_id, "card.freeze", change, request_id)


def unfreeze(user_id, card_id, *, request_id=None):
    """Make a blocked card active again; unfreezing an active card is a no-op."""
    def change(card):
        if card.status == "blocked":
            card.status = "active"
    return _change(user_id, card_id, "card.unfreeze", change, request_id)


def set_limits(user_id, card_id, *, daily_limit=None, monthly_limit=None, request_id=None):
    """Set the daily and/or monthly limit; monthly must cover daily, both above zero.

    Limits are decimal strings (or Decimals) in the card account's currency,
    like payment amounts; an omitted limit keeps its value.
    """
    if daily_limit is None and monthly_limit is None:
        raise errors.ValidationError("give daily_limit, monthly_limit or both", field="body")

    def change(card):
        currency = card.account.currency
        daily, monthly = card.daily_limit, card.monthly_limit
        if daily_limit is not None:
            daily = parse_amount(daily_limit, currency, field="daily_limit")
        if monthly_limit is not None:
            monthly = parse_amount(monthly_limit, currency, field="monthly_limit")
        if monthly < daily:
            raise errors.ValidationError(
                "monthly_limit must be at least the daily_limit "
                f"({format_amount(daily, currency)} {currency})", field="monthly_limit")
        card.daily_limit, card.monthly_limit = daily, monthly
    return _change(user_id, card_id, "card.limits", change, request_id)


def set_controls(user_id, card_id, *, online_enabled=None, contactless_enabled=None,
                 international_enabled=None, request_id=None):
    """Switch online, contactless and international payments on or off (None: unchanged)."""
    given = {"online_enabled": online_enabled, "contactless_enabled": contactless_enabled,
             "international_enabled": international_enabled}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        raise errors.ValidationError("give at least one of " + ", ".join(
            ("online_enabled", "contactless_enabled", "international_enabled")), field="body")
    for name, value in given.items():
        if not isinstance(value, bool):
            raise errors.ValidationError(f"{name} must be true or false", field=name)

    def change(card):
        for name, value in given.items():
            setattr(card, name, value)
    return _change(user_id, card_id, "card.controls", change, request_id)


def cancel(user_id, card_id, *, request_id=None):
    """Cancel the card for good: it can never pay, be unfrozen or be changed again.

    Cancelling a cancelled card is a no-op, so a retried request is safe.
    """
    def change(card):
        card.status = "cancelled"
    return _change(user_id, card_id, "card.cancel", change, request_id, allow_cancelled=True)


def _locked(user_id, card_id):
    """The card row, locked until the end of the transaction, if ``user_id`` holds it."""
    query = (Card.select(Card, Account)
             .join(Account)
             .where((Card.id == _uuid(card_id)) & (Card.user == _uuid(user_id))))
    card = query.for_update(of=Card).first()
    if card is None:
        raise errors.NotFound("card not found")
    return card


def _change(user_id, card_id, action, change, request_id, *, allow_cancelled=False):
    """Lock, change, save and audit one card in one transaction; return the card."""
    with db.atomic():
        card = _locked(user_id, card_id)
        if card.status == "cancelled" and not allow_cancelled:
            # Cancellation is final (the card may be in a bin or a thief's hands).
            raise errors.CardNotActive("card is cancelled: it cannot be changed")
        before = card_state(card)
        change(card)
        after = card_state(card)
        if after != before:
            card.updated_at = utcnow()
            card.save(only=[Card.status, Card.daily_limit, Card.monthly_limit,
                            Card.online_enabled, Card.contactless_enabled,
                            Card.international_enabled, Card.updated_at])
            audit.record(action, "card", card.id, actor_id=_uuid(user_id), before=before,
                         after=after, request_id=request_id)
    return card


# --------------------------------------------------------------------------
# Payments and refunds

@dataclass(frozen=True)
class CardPayment:
    """A card payment or refund as the API shows it (amounts in minor units)."""

    id: uuid.UUID
    card_id: uuid.UUID
    account_id: uuid.UUID
    kind: str
    amount: int
    currency: str
    merchant_name: str | None
    merchant_category: str | None
    balance_after: int
    created_at: datetime
    payment_id: uuid.UUID | None = None
    refunded: int = 0


def merchant_details(channel, merchant_name, merchant_category, description):
    """Check a payment's or authorization's channel and clean its texts.

    Returns ``(merchant_name, merchant_category, description)``.
    """
    if channel not in CHANNELS:
        raise errors.ValidationError(f"channel must be one of {', '.join(CHANNELS)}",
                                     field="channel")
    return (clean_text(merchant_name, "merchant_name", max_length=200, required=True),
            clean_text(merchant_category, "merchant_category", max_length=64, required=True),
            clean_text(description, "description", max_length=500))


def pay(user_id, card_id, *, amount, currency, merchant_name, merchant_category, channel,
        international=False, description=None, request_id=None):
    """Pay ``amount`` (decimal string in ``currency``) with the card; one ledger debit.

    Refused (422, nothing written) when the card is frozen, cancelled or
    expired, the channel is switched off, a limit would be exceeded or the
    account lacks the funds.
    """
    minor = parse_amount(amount, currency)
    merchant_name, merchant_category, description = merchant_details(
        channel, merchant_name, merchant_category, description)
    user_id, card_id = _uuid(user_id), _uuid(card_id)
    with db.atomic():
        posting = ledger.card_payment(
            user_id, card_id, minor, currency=currency, merchant_name=merchant_name,
            merchant_category=merchant_category, channel=channel,
            international=bool(international), description=description)
        payment = CardPayment(
            id=posting.debit.entry_id, card_id=card_id, account_id=posting.debit.account_id,
            kind="payment", amount=posting.amount, currency=posting.currency,
            merchant_name=merchant_name, merchant_category=merchant_category,
            balance_after=posting.debit.balance_after, created_at=posting.posted_at)
        audit.record("card.payment", "card", card_id, actor_id=user_id, after={
            "entry_id": payment.id, "amount": payment.amount, "currency": payment.currency,
            "merchant_name": merchant_name, "merchant_category": merchant_category,
            "channel": channel, "international": bool(international)}, request_id=request_id)
    return payment


def refund(user_id, card_id, payment_id, *, amount, request_id=None):
    """Refund ``amount`` (decimal string) of the card payment ``payment_id`` to its account.

    Several partial refunds are allowed; together they cannot exceed the
    payment (RefundExceedsPayment). A payment on another card, or someone
    else's, is NotFound.
    """
    user_id, card_id = _uuid(user_id), _uuid(card_id)
    payment = _payment_entry(user_id, card_id, payment_id)
    minor = parse_amount(amount, payment.currency)
    with db.atomic():
        try:
            posting = ledger.card_refund(user_id, payment.id, minor)
        except errors.RefundExceedsPayment as exc:
            raise _in_currency(exc, payment.currency) from None
        refunded = _refunded(payment.id)
        result = CardPayment(
            id=posting.credit.entry_id, card_id=card_id, account_id=posting.credit.account_id,
            kind="refund", amount=posting.amount, currency=posting.currency,
            merchant_name=payment.merchant_name, merchant_category=payment.merchant_category,
            balance_after=posting.credit.balance_after, created_at=posting.posted_at,
            payment_id=payment.id, refunded=refunded)
        audit.record("card.refund", "card", card_id, actor_id=user_id, after={
            "entry_id": result.id, "payment_id": payment.id, "amount": result.amount,
            "currency": result.currency, "refunded_total": refunded}, request_id=request_id)
    return result


_MINOR_UNITS_LEFT = re.compile(r"(-?\d+) minor units left")


def _in_currency(exc, currency):
    """``exc`` (RefundExceedsPayment) with "4000 minor units left" as "40.00 USD left".

    The ledger function says how much is left in minor units (it knows no
    decimal places); a client is shown amounts only as decimal strings.
    """
    detail = _MINOR_UNITS_LEFT.sub(
        lambda m: f"{format_amount(int(m.group(1)), currency)} {currency} left", exc.detail)
    return errors.RefundExceedsPayment(detail, field=exc.field, **exc.extra)


def _payment_entry(user_id, card_id, payment_id):
    entry = (Transaction.select(Transaction)
             .join(Card, on=(Transaction.card == Card.id))
             .where((Transaction.id == _uuid(payment_id, "payment_id"))
                    & (Transaction.card == card_id)
                    & (Transaction.type == "payment")
                    & (Card.user == user_id))
             .first())
    if entry is None:
        raise errors.NotFound("payment not found", field="payment_id")
    return entry


def _refunded(payment_id):
    """Total refunded so far against the payment entry ``payment_id`` (minor units)."""
    return int(Transaction.select(pw.fn.COALESCE(pw.fn.SUM(Transaction.amount), 0))
               .where((Transaction.refund_of == payment_id)
                      & (Transaction.direction == "inbound"))
               .scalar())


# --------------------------------------------------------------------------
# Key rotation

def rotate_keys(settings, *, batch_size=500):
    """Re-encrypt every stored card number under the first configured key.

    Run after prepending a new key to HOARDRUN_CARD_ENCRYPTION_KEYS (old
    keys still listed). Each batch is one transaction; a run interrupted
    half-way is finished by the next one (rotating an already rotated token
    is harmless). The numbers are never logged: peewee's SQL echo shows
    only ciphertext. Returns the number of cards re-encrypted.
    """
    cipher = CardCipher.from_settings(settings)
    done = 0
    last = None
    while True:
        with db.atomic():
            query = (Card.select(Card.id, Card.number_encrypted)
                     .order_by(Card.id)
                     .limit(batch_size))
            if last is not None:
                query = query.where(Card.id > last)
            rows = list(query.tuples())
            for card_id, token in rows:
                (Card.update(number_encrypted=cipher.rotate(token))
                 .where(Card.id == card_id)
                 .execute())
        if not rows:
            return done
        done += len(rows)
        last = rows[-1][0]


def _uuid(value, field=None):
    return parse_id(value, field or "card", field=field)
