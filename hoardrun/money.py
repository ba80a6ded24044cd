"""Currencies and amounts: integers of minor units, never floats.

The API speaks decimal strings ("12.34"); the database stores BIGINT minor
units (1234). ``parse_amount`` and ``format_amount`` are the only two doors
between them.
"""

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from .errors import AmountError, UnknownCurrency


@dataclass(frozen=True)
class Currency:
    code: str
    exponent: int
    name: str

    @property
    def factor(self):
        return 10 ** self.exponent


# ISO 4217 codes we hold money in, with their minor-unit exponent. A frozen
# copy of this list is the CHECK constraint on every currency column, so
# adding one is a migration.
CURRENCIES = {c.code: c for c in (
    Currency("AED", 2, "UAE Dirham"),
    Currency("AUD", 2, "Australian Dollar"),
    Currency("BHD", 3, "Bahraini Dinar"),
    Currency("BRL", 2, "Brazilian Real"),
    Currency("CAD", 2, "Canadian Dollar"),
    Currency("CHF", 2, "Swiss Franc"),
    Currency("CLP", 0, "Chilean Peso"),
    Currency("CNY", 2, "Yuan Renminbi"),
    Currency("CZK", 2, "Czech Koruna"),
    Currency("DKK", 2, "Danish Krone"),
    Currency("EUR", 2, "Euro"),
    Currency("GBP", 2, "Pound Sterling"),
    Currency("GHS", 2, "Ghana Cedi"),
    Currency("HKD", 2, "Hong Kong Dollar"),
    Currency("INR", 2, "Indian Rupee"),
    Currency("ISK", 0, "Iceland Krona"),
    Currency("JOD", 3, "Jordanian Dinar"),
    Currency("JPY", 0, "Yen"),
    Currency("KES", 2, "Kenyan Shilling"),
    Currency("KRW", 0, "Won"),
    Currency("KWD", 3, "Kuwaiti Dinar"),
    Currency("MXN", 2, "Mexican Peso"),
    Currency("NGN", 2, "Naira"),
    Currency("NOK", 2, "Norwegian Krone"),
    Currency("NZD", 2, "New Zealand Dollar"),
    Currency("OMR", 3, "Rial Omani"),
    Currency("PLN", 2, "Zloty"),
    Currency("SEK", 2, "Swedish Krona"),
    Currency("SGD", 2, "Singapore Dollar"),
    Currency("TND", 3, "Tunisian Dinar"),
    Currency("USD", 2, "US Dollar"),
    Currency("ZAR", 2, "Rand"),
)}
CURRENCY_CODES = tuple(sorted(CURRENCIES))

# 10^15 minor units (ten trillion dollars) keeps every sum of a few thousand
# amounts far inside BIGINT, so no arithmetic on balances can overflow.
MAX_MINOR_UNITS = 10 ** 15

_DECIMAL_TEXT = re.compile(r"^-?[0-9]{1,19}(\.[0-9]{1,19})?$")
_LONG_DECIMAL_TEXT = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def get_currency(code):
    """Return the ``Currency`` for an upper-case ISO 4217 ``code``."""
    if not isinstance(code, str) or code not in CURRENCIES:
        shown = code if isinstance(code, str) and len(code) <= 8 else "…"
        raise UnknownCurrency(f"{shown!r} is not a supported ISO 4217 currency code "
                              "(upper case, e.g. USD)", field="currency")
    return CURRENCIES[code]


def parse_amount(value, currency, *, field="amount", allow_zero=False, allow_negative=False):
    """Turn a decimal string (or JSON Decimal / int) into integer minor units.

    Refuses floats, exponents, NaN/Infinity, more places than the currency
    has, and magnitudes above ``MAX_MINOR_UNITS``. Zero and negatives are
    refused unless explicitly allowed.
    """
    cur = currency if isinstance(currency, Currency) else get_currency(currency)
    if isinstance(value, bool) or isinstance(value, float):
        raise AmountError(f"{field} must be a decimal string such as \"12.34\", not a float",
                          field=field)
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise AmountError(f"{field} must be a finite number", field=field)
        text = str(value)
    elif isinstance(value, str):
        # Not stripped: " 5.00" is not the plain decimal the message asks for,
        # and what a client sent must be what was read (no silent repair).
        text = value
    else:
        raise AmountError(f"{field} must be a decimal string such as \"12.34\"", field=field)
    if not _DECIMAL_TEXT.fullmatch(text):
        if _LONG_DECIMAL_TEXT.fullmatch(text):
            # Plain digits, just too many of them: say which limit was hit.
            if len(text.lstrip("-").partition(".")[0]) > 19:
                raise AmountError(f"{field} is too large", field=field)
            raise AmountError(f"{field} has more than {cur.exponent} decimal places "
                              f"for {cur.code}", field=field)
        if text != text.strip():
            raise AmountError(f"{field} must be a plain decimal such as \"12.34\" "
                              "without spaces", field=field)
        raise AmountError(f"{field} must be a plain decimal such as \"12.34\" "
                          "(no exponent, sign or separators)", field=field)
    try:
        dec = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex already guards this
        raise AmountError(f"{field} is not a number", field=field) from None
    places = -dec.as_tuple().exponent if dec.as_tuple().exponent < 0 else 0
    if places > cur.exponent:
        raise AmountError(f"{field} has more than {cur.exponent} decimal places "
                          f"for {cur.code}", field=field)
    minor = int(dec * cur.factor)
    if abs(minor) > MAX_MINOR_UNITS:
        raise AmountError(f"{field} is too large", field=field)
    if minor == 0 and not allow_zero:
        raise AmountError(f"{field} must be greater than zero", field=field)
    if minor < 0 and not allow_negative:
        raise AmountError(f"{field} must not be negative", field=field)
    return minor


def _whole_minor(minor):
    """``minor`` as an int; a float, bool or fraction of a minor unit is a bug upstream.

    ``int()`` would silently truncate 12.9 to 12, so anything but a whole
    number is refused. An integral Decimal is fine: PostgreSQL's SUM(bigint)
    returns numeric.
    """
    if isinstance(minor, int) and not isinstance(minor, bool):
        return minor
    if isinstance(minor, Decimal) and minor.is_finite() and minor == minor.to_integral_value():
        return int(minor)
    raise TypeError(f"minor units must be a whole number, not {type(minor).__name__} {minor!r}")


def format_amount(minor, currency):
    """Render integer minor units as the currency's decimal string ("12.34")."""
    cur = currency if isinstance(currency, Currency) else get_currency(currency)
    minor = _whole_minor(minor)
    if cur.exponent == 0:
        return str(minor)
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), cur.factor)
    return f"{sign}{whole}.{frac:0{cur.exponent}d}"


def round_to_minor(value, currency):
    """Round a Decimal amount of major units to minor units.

    Banker's rounding (ROUND_HALF_EVEN). NOTE: not the rule for a trade's
    cash leg any more: the ledger functions (migration 004) round those in
    the house's favour, a buy up and a sell down.
    """
    cur = currency if isinstance(currency, Currency) else get_currency(currency)
    if isinstance(value, (float, bool)):
        # Decimal(1.005) is 1.00499999...: the float already lost the half cent.
        raise TypeError(f"round_to_minor needs a Decimal, not {type(value).__name__}")
    try:
        value = Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise AmountError("amount must be a decimal number", field="amount") from None
    if not value.is_finite():
        raise AmountError("amount must be a finite number", field="amount")
    return int((value * cur.factor).to_integral_value(rounding=ROUND_HALF_EVEN))
