"""Opening and managing accounts (balances only ever change through the ledger).

Every function here takes the calling user's id and answers NotFound for an
account that exists but is not theirs, exactly as for one that does not
exist. Every state change writes an audit row in the same transaction.
"""

import secrets

import peewee as pw

from . import audit, errors
from .clock import utcnow
from .db import db
from .ids import as_uuid
from .models import ACCOUNT_TYPES, SETTLEMENT, Account, Card, Investment
from .text import clean_text
from .money import get_currency
from .security import luhn_check_digit

# Customer numbers: 10 random digits (first non-zero) + a Luhn check digit.
# Settlement numbers are 8 or 10 digits, so the two ranges can never collide.
ACCOUNT_NUMBER_DIGITS = 11
_NUMBER_ATTEMPTS = 5
NAME_MAX = 100
# A frozen (suspended) account is an admin's decision; the owner cannot
# close it or make it primary until it is unfrozen.
_OWNER_MAY_CHANGE = ("active", "inactive")


def new_account_number():
    """A random 11-digit account number whose last digit is a Luhn check digit."""
    body = str(secrets.randbelow(9) + 1) + "".join(
        str(secrets.randbelow(10)) for _ in range(ACCOUNT_NUMBER_DIGITS - 2))
    return body + luhn_check_digit(body)


def _clean_name(name):
    return clean_text(name, "name", max_length=NAME_MAX, required=True)


def snapshot(account):
    """The audit view of an account (no secrets; balances in minor units)."""
    return {"name": account.name, "type": account.type, "status": account.status,
            "currency": account.currency, "balance": account.balance,
            "is_primary": account.is_primary, "account_number": account.account_number}


def open_account(user_id, type, currency, name, *, is_primary=None, overdraft_limit=0,
                 request_id=None):
    """Open an account for ``user_id``; its first account becomes primary.

    ``is_primary=True`` makes this the primary account (the previous one is
    demoted in the same transaction).
    """
    if type not in ACCOUNT_TYPES:
        raise errors.ValidationError(f"type must be one of {', '.join(ACCOUNT_TYPES)}",
                                     field="type")
    get_currency(currency)
    name = _clean_name(name)
    with db.atomic():
        _lock_owner(user_id)
        has_primary = (Account.select(Account.id)
                       .where((Account.user == user_id) & (Account.is_primary == True))  # noqa: E712
                       .exists())
        make_primary = (not has_primary) if is_primary is None else bool(is_primary)
        if make_primary and has_primary:
            _demote_primary(user_id)
        for attempt in range(_NUMBER_ATTEMPTS):
            try:
                with db.atomic():
                    # Stamped here, not by the column default (the
                    # transaction's start): "oldest first" must hold for
                    # accounts opened within one transaction's time.
                    now = _now()
                    account = Account.create(user=user_id, account_number=new_account_number(),
                                             name=name, type=type, currency=currency,
                                             overdraft_limit=overdraft_limit,
                                             is_primary=make_primary, created_at=now,
                                             updated_at=now)
                break
            except pw.IntegrityError as exc:
                # Only a clash of random numbers is worth another try.
                if "account_number" not in str(exc) or attempt == _NUMBER_ATTEMPTS - 1:
                    raise
        audit.record("account.open", "account", account.id, actor_id=user_id,
                     after=snapshot(account), request_id=request_id)
    # Re-read so the database's defaults (timestamps) are what the caller sees.
    return Account.get_by_id(account.id)


# The hot reads (every account GET, the account list) are SQL text built
# once from the model: building and compiling the peewee select cost more CPU
# than running it (PERFORMANCE.md item 1; issue 12: an account GET fell from
# ~0.8 to ~0.4 ms of CPU in process). The column list is the model's own, so
# a new field is read here without anyone remembering to. Parameters go
# through the fields' ``db_value``, as the peewee comparisons did.
_FIELDS = tuple(Account._meta.sorted_fields)
_SELECT_WITH_HELD = "SELECT {}, hoardrun_held(a.id, %s) AS held FROM {} a ".format(
    ", ".join(f'a."{field.column_name}"' for field in _FIELDS), Account._meta.table_name)
_GET_SQL = _SELECT_WITH_HELD + "WHERE a.id = %s AND a.user_id = %s AND a.type <> %s LIMIT 1"
_LIST_SQL = _SELECT_WITH_HELD + "WHERE a.user_id = %s ORDER BY a.created_at, a.id"
_CONVERTERS = tuple((field.name, field.python_value) for field in _FIELDS)


def _with_held(row):
    """The ``Account`` of a ``_SELECT_WITH_HELD`` row, with ``held`` set.

    Built as a peewee select builds it: each column through its field's
    ``python_value`` (UUIDs, aware UTC datetimes, Decimal, bool), passed to
    the constructor without defaults, nothing left marked dirty. ``held`` is
    what the ledger's own ``hoardrun_held`` says active card holds reserve
    (the sum the funds checks use), so an expired hold stops showing the
    moment it stops counting.
    """
    values = {name: convert(value) for (name, convert), value in zip(_CONVERTERS, row)}
    account = Account(__no_default__=1, held=row[len(_CONVERTERS)], **values)
    account._dirty.clear()
    return account


def list_accounts(user_id, *, now=None):
    """The user's accounts, oldest first (closed ones included, marked by status)."""
    now = utcnow() if now is None else now
    rows = db.execute_sql(_LIST_SQL, (now, Account.user.db_value(user_id))).fetchall()
    return [_with_held(row) for row in rows]


def get_account(user_id, account_id, *, now=None):
    """The user's account ``account_id``; NotFound if it is missing or someone else's.

    ``held`` on it is what active card holds reserve at ``now`` (default: the
    current time): its available balance is ``balance - held``.
    """
    now = utcnow() if now is None else now
    row = db.execute_sql(_GET_SQL, (now, Account.id.db_value(account_id),
                                    Account.user.db_value(user_id), SETTLEMENT)).fetchone()
    if row is None:
        raise errors.NotFound("account not found")
    return _with_held(row)


def _locked_account(user_id, account_id):
    """``get_account`` holding the row lock for the rest of the transaction.

    FOR UPDATE, the same lock the ledger takes, so a change here and a
    money movement on the same account happen one after the other.
    """
    query = (Account
             .select()
             .where((Account.id == account_id)
                    & (Account.user == user_id)
                    & (Account.type != SETTLEMENT)))
    account = query.for_update().first()
    if account is None:
        raise errors.NotFound("account not found")
    return account


def rename(user_id, account_id, name, *, request_id=None):
    """Give the user's account a new display name; return the account."""
    name = _clean_name(name)
    with db.atomic():
        account = _locked_account(user_id, account_id)
        if account.status == "closed":
            raise errors.AccountNotActive("a closed account cannot be renamed")
        if account.name != name:
            before = {"name": account.name}
            (Account
             .update(name=name, updated_at=_now())
             .where(Account.id == account.id)
             .execute())
            audit.record("account.rename", "account", account.id, actor_id=user_id,
                         before=before, after={"name": name}, request_id=request_id)
    return get_account(user_id, account_id)


def set_primary(user_id, account_id, *, request_id=None):
    """Make ``account_id`` the user's primary account, atomically.

    The old primary is demoted and the new one promoted in one transaction;
    the partial unique index ``accounts_one_primary_per_user`` guarantees at
    most one primary per user even against writers that bypass this code.
    """
    with db.atomic():
        _lock_owner(user_id)
        account = get_account(user_id, account_id)
        if account.status != "active":
            raise errors.AccountNotActive(f"account is {account.status}; only an active "
                                          "account can be primary")
        if account.is_primary:
            return account
        previous = (Account
                    .select(Account.id)
                    .where((Account.user == user_id) & (Account.is_primary == True))  # noqa: E712
                    .scalar())
        _demote_primary(user_id)
        (Account
         .update(is_primary=True, updated_at=_now())
         .where(Account.id == account.id)
         .execute())
        audit.record("account.set_primary", "account", account.id, actor_id=user_id,
                     before={"primary_account_id": previous},
                     after={"primary_account_id": account.id}, request_id=request_id)
    return get_account(user_id, account_id)


def close(user_id, account_id, *, request_id=None):
    """Close the user's account; only at a zero balance and with nothing invested.

    The balance, pending card authorizations and holdings are checked under
    the same row lock the ledger takes, so no deposit, authorization or buy
    can land between the check and the close. A
    closed account keeps no assets: a holding there could never be sold, so
    one held is refused (sell it first), and the account's cards are
    cancelled with it. A closed account stops being primary; the user's
    oldest other active account becomes primary, so payments to the user
    still land whenever they have an active account.
    """
    with db.atomic():
        # Lock order: the user (primary changes), the account's cards (a card
        # payment locks its card before its account), then the account.
        _lock_owner(user_id)
        get_account(user_id, account_id)  # NotFound before touching anyone's cards
        cards = list(Card
                     .select()
                     .where(Card.account == account_id)
                     .order_by(Card.id)
                     .for_update())
        account = _locked_account(user_id, account_id)
        if account.status == "closed":
            raise errors.AccountNotActive("account is already closed")
        if account.status not in _OWNER_MAY_CHANGE:
            raise errors.AccountNotActive(f"account is {account.status} and cannot be closed")
        if account.balance != 0:
            raise errors.AccountNotEmpty(
                "only an account with a zero balance can be closed; move the money out first",
                balance=account.balance)
        # A pending card authorization would find its account gone at capture.
        pending = db.execute_sql("SELECT hoardrun_held(%s, %s)",
                                 (account.id.hex, _now())).fetchone()[0]
        if pending:
            raise errors.AccountNotEmpty(
                "an account with pending card authorizations cannot be closed; void them or "
                "let them be captured first", pending_holds=int(pending))
        held = [symbol for (symbol,) in (Investment
                                         .select(Investment.symbol)
                                         .where((Investment.account == account.id)
                                                & (Investment.quantity > 0))
                                         .order_by(Investment.symbol)
                                         .tuples())]
        if held:
            raise errors.AccountNotEmpty(
                "an account that holds investments cannot be closed; sell them first "
                f"({', '.join(held)})", holdings=held)
        now = _now()
        (Account
         .update(status="closed", closed_at=now, is_primary=False, updated_at=now)
         .where(Account.id == account.id)
         .execute())
        for card in cards:
            if card.status != "cancelled":
                (Card
                 .update(status="cancelled", updated_at=now)
                 .where(Card.id == card.id)
                 .execute())
                audit.record("card.cancel", "card", card.id, actor_id=user_id,
                             before={"status": card.status},
                             after={"status": "cancelled", "reason": "account closed"},
                             request_id=request_id)
        promoted = _promote_primary(user_id, now) if account.is_primary else None
        audit.record("account.close", "account", account.id, actor_id=user_id,
                     before=snapshot(account),
                     after={**snapshot(account), "status": "closed", "is_primary": False,
                            "primary_account_id": promoted},
                     request_id=request_id)
    return get_account(user_id, account_id)


def _promote_primary(user_id, now):
    """Make the user's oldest active account primary; return its id (None if none)."""
    successor = (Account
                 .select(Account.id)
                 .where((Account.user == user_id)
                        & (Account.status == "active")
                        & (Account.type != SETTLEMENT))
                 .order_by(Account.created_at, Account.id)
                 .scalar())
    if successor is not None:
        (Account
         .update(is_primary=True, updated_at=now)
         .where(Account.id == successor)
         .execute())
    return successor


def _lock_owner(user_id):
    """Serialise primary-account changes of one user.

    Two concurrent switches (or first-account opens) would otherwise both
    see the old state and the second would trip the one-primary index. The
    user row is the lock: the ledger never locks users FOR UPDATE.
    NOTE: FOR NO KEY UPDATE, not FOR UPDATE. The ledger's inserts (a transfer
    row, a P2P row) reference the user and take FOR KEY SHARE on it while they
    hold account locks; FOR UPDATE conflicts with that, so a close (user, then
    account) and a transfer (account, then user) could deadlock. NO KEY
    UPDATE still excludes a second primary-account change, and no insert.
    """
    db.execute_sql("SELECT id FROM users WHERE id = %s FOR NO KEY UPDATE",
                   (as_uuid(user_id).hex,))


def _demote_primary(user_id):
    (Account
     .update(is_primary=False, updated_at=_now())
     .where((Account.user == user_id) & (Account.is_primary == True))  # noqa: E712
     .execute())


def _now():
    return utcnow()

