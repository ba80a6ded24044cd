"""Amounts cross the API as decimal strings and live as integer minor units."""

from decimal import Decimal

import pytest

from hoardrun.errors import AmountError, UnknownCurrency, ValidationError
from hoardrun.money import (CURRENCIES, MAX_MINOR_UNITS, format_amount, get_currency,
                            parse_amount, round_to_minor)


@pytest.mark.parametrize("code, exponent", [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0),
                                            ("KWD", 3), ("BHD", 3)])
def test_currency_exponents_follow_iso_4217(code, exponent):
    currency = get_currency(code)
    assert (currency.code, currency.exponent, currency.factor) == (code, exponent, 10 ** exponent)


def test_every_currency_code_is_three_upper_case_letters():
    for code, currency in CURRENCIES.items():
        assert code == currency.code and len(code) == 3 and code.isalpha() and code.isupper()
        assert currency.exponent in (0, 2, 3)


@pytest.mark.parametrize("code", ["usd", "Usd", "XXX", "US", "USDT", "", None, 840, "x" * 500])
def test_unknown_or_lower_case_currency_is_refused(code):
    with pytest.raises(UnknownCurrency) as info:
        get_currency(code)
    assert info.value.field == "currency"
    assert "x" * 50 not in str(info.value)  # a huge input is not echoed back


@pytest.mark.parametrize("text, currency, minor", [
    ("12.34", "USD", 1234),
    ("12.3", "USD", 1230),
    ("12", "USD", 1200),
    ("0.01", "USD", 1),
    ("1000", "JPY", 1000),
    ("1", "JPY", 1),
    ("1.234", "KWD", 1234),
    ("0.001", "KWD", 1),
    ("5.1", "KWD", 5100),
    ("10000000000000", "USD", MAX_MINOR_UNITS),  # the largest amount allowed
])
def test_parse_decimal_strings_to_minor_units(text, currency, minor):
    assert parse_amount(text, currency) == minor


@pytest.mark.parametrize("value, currency, minor", [
    (Decimal("12.34"), "USD", 1234),  # what the JSON handler gives for 12.34
    (Decimal("12.30"), "USD", 1230),
    (Decimal("500"), "JPY", 500),
    (5, "USD", 500),  # a JSON integer is whole major units
    (5, "JPY", 5),
    (5, "KWD", 5000),
])
def test_parse_json_numbers_without_floats(value, currency, minor):
    assert parse_amount(value, currency) == minor


def test_parse_accepts_a_currency_object():
    assert parse_amount("1.5", get_currency("KWD")) == 1500


REFUSED = [
    pytest.param(12.34, "USD", id="float"),
    pytest.param(1.0, "JPY", id="whole-float"),
    pytest.param(True, "USD", id="bool-true"),
    pytest.param(False, "USD", id="bool-false"),
    pytest.param(None, "USD", id="none"),
    pytest.param(["1"], "USD", id="list"),
    pytest.param("1e3", "USD", id="exponent"),
    pytest.param("1E3", "USD", id="exponent-upper"),
    pytest.param(Decimal("1E+3"), "USD", id="decimal-exponent"),
    pytest.param("NaN", "USD", id="nan"),
    pytest.param("Infinity", "USD", id="infinity"),
    pytest.param("-Infinity", "USD", id="minus-infinity"),
    pytest.param(Decimal("NaN"), "USD", id="decimal-nan"),
    pytest.param(Decimal("Infinity"), "USD", id="decimal-infinity"),
    pytest.param("1.234", "USD", id="three-places-usd"),
    pytest.param(Decimal("1.234"), "USD", id="decimal-three-places-usd"),
    pytest.param("1.5", "JPY", id="places-jpy"),
    pytest.param("1.0", "JPY", id="zero-place-jpy"),
    pytest.param("1.2345", "KWD", id="four-places-kwd"),
    pytest.param("-5", "USD", id="negative"),
    pytest.param("-0.01", "USD", id="negative-cent"),
    pytest.param(-5, "USD", id="negative-int"),
    pytest.param("0", "USD", id="zero"),
    pytest.param("0.00", "USD", id="zero-places"),
    pytest.param("-0", "USD", id="negative-zero"),
    pytest.param(0, "JPY", id="zero-int"),
    pytest.param("10000000000000.01", "USD", id="over-max"),
    pytest.param("1000000000000001", "JPY", id="over-max-jpy"),
    pytest.param("99999999999999999999", "USD", id="twenty-digits"),
    pytest.param("9" * 400, "USD", id="huge"),
    pytest.param(10 ** 20, "USD", id="huge-int"),
    pytest.param("", "USD", id="empty"),
    pytest.param(" ", "USD", id="blank"),
    pytest.param("1,000", "USD", id="thousands-separator"),
    pytest.param("1 000", "USD", id="space-separator"),
    pytest.param("12,34", "EUR", id="decimal-comma"),
    pytest.param("+5", "USD", id="plus-sign"),
    pytest.param(".5", "USD", id="no-leading-digit"),
    pytest.param("5.", "USD", id="trailing-point"),
    pytest.param("$5", "USD", id="currency-symbol"),
    pytest.param("5 USD", "USD", id="currency-suffix"),
    pytest.param("0x10", "USD", id="hex"),
    pytest.param("١٢", "USD", id="arabic-indic-digits"),
    pytest.param("5\n6", "USD", id="embedded-newline"),
    # Not repaired by stripping: what was sent is what is read.
    pytest.param(" 5.00", "USD", id="leading-space"),
    pytest.param("5.00 ", "USD", id="trailing-space"),
    pytest.param("5.00\n", "USD", id="trailing-newline"),
    pytest.param("\t5", "JPY", id="leading-tab"),
    pytest.param("\u00a05.00", "USD", id="no-break-space"),
]


@pytest.mark.parametrize("value, currency", REFUSED)
def test_bad_amounts_are_refused_with_the_field_named(value, currency):
    with pytest.raises(AmountError) as info:
        parse_amount(value, currency, field="amount")
    assert info.value.field == "amount"
    assert info.value.status == 422
    assert "amount" in str(info.value)
    assert len(str(info.value)) < 200  # one readable line, the input not echoed at length


@pytest.mark.parametrize("text, says", [
    ("99999999999999999999", "too large"),
    ("9" * 400, "too large"),
    ("1." + "0" * 25, "more than 2 decimal places"),
    ("1e3", "no exponent"),
    ("  7.50 ", "without spaces"),
])
def test_refusal_says_which_limit_was_hit(text, says):
    with pytest.raises(AmountError, match=says):
        parse_amount(text, "USD")


def test_error_names_the_caller_field():
    with pytest.raises(AmountError) as info:
        parse_amount("1.001", "USD", field="daily_limit")
    assert info.value.field == "daily_limit" and "daily_limit" in str(info.value)
    assert "2 decimal places" in str(info.value)


@pytest.mark.parametrize("currency", ["usd", "XXX", "", None])
def test_bad_currency_is_refused_before_the_amount(currency):
    with pytest.raises(UnknownCurrency) as info:
        parse_amount("1.00", currency)
    assert info.value.field == "currency"
    assert isinstance(info.value, ValidationError)


def test_zero_and_negative_only_when_allowed():
    assert parse_amount("0", "USD", allow_zero=True) == 0
    assert parse_amount("-0.00", "USD", allow_zero=True) == 0
    assert parse_amount("-12.34", "USD", allow_negative=True) == -1234
    with pytest.raises(AmountError, match="negative"):
        parse_amount("-1", "USD", allow_zero=True)
    with pytest.raises(AmountError, match="greater than zero"):
        parse_amount("0", "USD", allow_negative=True)
    assert parse_amount("-10000000000000", "USD", allow_negative=True) == -MAX_MINOR_UNITS
    with pytest.raises(AmountError, match="too large"):
        parse_amount("-10000000000000.01", "USD", allow_negative=True)


@pytest.mark.parametrize("minor, currency, text", [
    (1234, "USD", "12.34"),
    (5, "USD", "0.05"),
    (100, "USD", "1.00"),
    (0, "USD", "0.00"),
    (-1234, "USD", "-12.34"),
    (-5, "USD", "-0.05"),
    (1000, "JPY", "1000"),
    (-7, "JPY", "-7"),
    (1234, "KWD", "1.234"),
    (1, "KWD", "0.001"),
    (MAX_MINOR_UNITS, "USD", "10000000000000.00"),
    (Decimal("1234"), "USD", "12.34"),  # PostgreSQL's SUM(bigint) comes back as numeric
])
def test_format_minor_units_as_decimal_string(minor, currency, text):
    assert format_amount(minor, currency) == text


@pytest.mark.parametrize("minor", [12.5, 12.0, Decimal("12.5"), True, "1234", None])
def test_format_refuses_anything_but_whole_minor_units(minor):
    """A float or fraction of a cent is a bug upstream: never silently truncate it."""
    with pytest.raises(TypeError):
        format_amount(minor, "USD")


@pytest.mark.parametrize("currency", ["USD", "JPY", "KWD", "CLP", "BHD"])
@pytest.mark.parametrize("minor", [1, 9, 10, 99, 100, 101, 123456789, MAX_MINOR_UNITS])
def test_round_trip(minor, currency):
    text = format_amount(minor, currency)
    assert parse_amount(text, currency) == minor
    assert format_amount(parse_amount(text, currency), currency) == text
    assert parse_amount("-" + text, currency, allow_negative=True) == -minor


@pytest.mark.parametrize("value, currency, minor", [
    (Decimal("1.005"), "USD", 100),  # half to even: down to the even cent
    (Decimal("1.015"), "USD", 102),  # half to even: up to the even cent
    (Decimal("1.0051"), "USD", 101),
    (Decimal("1.0049"), "USD", 100),
    (Decimal("-1.005"), "USD", -100),
    (Decimal("2.5"), "JPY", 2),
    (Decimal("3.5"), "JPY", 4),
    (Decimal("1.2345"), "KWD", 1234),
    (Decimal("1.2355"), "KWD", 1236),
    (Decimal("12.34"), "USD", 1234),
    ("0.125", "USD", 12),
    (7, "JPY", 7),
    (Decimal("3") * Decimal("33.333333"), "USD", 10000),  # a cash leg: quantity x price
])
def test_round_to_minor_uses_bankers_rounding(value, currency, minor):
    assert round_to_minor(value, currency) == minor


@pytest.mark.parametrize("value", [1.005, 0.1, True])
def test_round_to_minor_refuses_floats(value):
    """Decimal(1.005) is 1.00499999…: a float would round the wrong way."""
    with pytest.raises(TypeError):
        round_to_minor(value, "USD")


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), "NaN", "-Infinity",
                                   "abc", None])
def test_round_to_minor_refuses_non_numbers(value):
    with pytest.raises(AmountError):
        round_to_minor(value, "USD")


def test_round_to_minor_refuses_unknown_currency():
    with pytest.raises(UnknownCurrency):
        round_to_minor(Decimal("1"), "usd")
