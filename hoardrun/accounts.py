"""Opening and managing accounts (balances only ever change through the ledger)."""

import secrets

import peewee as pw

from . import errors
from .db import db
from .models import ACCOUNT_TYPES, Account
from .money import get_currency
from .security import luhn_check_digit

# Customer numbers: 10 random digits (first non-zero) + a Luhn check digit.
# Settlement numbers are 8 digits, so the two ranges can never collide.
ACCOUNT_NUMBER_DIGITS = 11
_NUMBER_ATTEMPTS = 5


def new_account_number():
    """A random 11-digit account number whose last digit is a Luhn check digit."""
    body = str(secrets.randbelow(9) + 1) + "".join(
        str(secrets.randbelow(10)) for _ in range(ACCOUNT_NUMBER_DIGITS - 2))
    return body + luhn_check_digit(body)


def open_account(user_id, type, currency, name, *, is_primary=None, overdraft_limit=0):
    """Open an account for ``user_id``; its first account becomes primary.

    ``is_primary=True`` makes this the primary account (the previous one is
    demoted in the same transaction).
    """
    if type not in ACCOUNT_TYPES:
        raise errors.ValidationError(f"type must be one of {', '.join(ACCOUNT_TYPES)}",
                                     field="type")
    get_currency(currency)
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise errors.ValidationError("name must be 1 to 100 characters", field="name")
    with db.atomic():
        has_primary = (Account.select(Account.id)
                       .where((Account.user == user_id) & (Account.is_primary == True))  # noqa: E712
                       .exists())
        make_primary = (not has_primary) if is_primary is None else bool(is_primary)
        if make_primary and has_primary:
            _demote_primary(user_id)
        for attempt in range(_NUMBER_ATTEMPTS):
            try:
                with db.atomic():
                    return Account.create(user=user_id, account_number=new_account_number(),
                                          name=name, type=type, currency=currency,
                                          overdraft_limit=overdraft_limit,
                                          is_primary=make_primary)
            except pw.IntegrityError as exc:
                # Only a clash of random numbers is worth another try.
                if "account_number" not in str(exc) or attempt == _NUMBER_ATTEMPTS - 1:
                    raise


def _demote_primary(user_id):
    (Account.update(is_primary=False)
     .where((Account.user == user_id) & (Account.is_primary == True))  # noqa: E712
     .execute())
