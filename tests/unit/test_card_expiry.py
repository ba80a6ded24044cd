"""Card expiry: valid through the last day of the expiry month, in UTC."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from hoardrun.cards import effective_status, expires_at, expiry_for, is_expired


def _card(month, year, status="active"):
    return SimpleNamespace(expiry_month=month, expiry_year=year, status=status)


def _at(*args):
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("month, year, last_valid, first_invalid", [
    (1, 2030, _at(2030, 1, 31, 23, 59, 59, 999999), _at(2030, 2, 1)),
    (2, 2028, _at(2028, 2, 29, 23, 59, 59, 999999), _at(2028, 3, 1)),   # leap year
    (2, 2029, _at(2029, 2, 28, 23, 59, 59, 999999), _at(2029, 3, 1)),
    (4, 2030, _at(2030, 4, 30, 23, 59, 59, 999999), _at(2030, 5, 1)),
    (12, 2030, _at(2030, 12, 31, 23, 59, 59, 999999), _at(2031, 1, 1)),  # December
])
def test_card_is_valid_through_the_last_instant_of_its_expiry_month(month, year, last_valid,
                                                                     first_invalid):
    card = _card(month, year)
    assert not is_expired(card, last_valid)
    assert not is_expired(card, _at(year, month, 1))
    assert is_expired(card, first_invalid)
    assert expires_at(month, year) == first_invalid


def test_expiry_is_judged_in_utc_not_local_time():
    card = _card(6, 2030)
    # 1 July 01:00 in UTC+02:00 is still 30 June in UTC: the card is valid.
    plus_two = timezone(timedelta(hours=2))
    assert not is_expired(card, datetime(2030, 7, 1, 1, 0, tzinfo=plus_two))
    # 30 June 20:00 in UTC-05:00 is already 1 July in UTC: expired.
    minus_five = timezone(timedelta(hours=-5))
    assert is_expired(card, datetime(2030, 6, 30, 20, 0, tzinfo=minus_five))


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        is_expired(_card(1, 2030), datetime(2030, 1, 1))


@pytest.mark.parametrize("now, expected", [
    (_at(2026, 1, 31, 23, 0), (1, 2029)),
    (_at(2026, 12, 31, 23, 59), (12, 2029)),
    (_at(2028, 2, 29, 12, 0), (2, 2031)),
])
def test_new_cards_expire_in_the_issue_month_three_years_on(now, expected):
    assert expiry_for(now) == expected


def test_users_see_expired_unless_the_card_was_cancelled():
    after = _at(2031, 1, 1)
    assert effective_status(_card(12, 2030), after) == "expired"
    assert effective_status(_card(12, 2030, "blocked"), after) == "expired"
    assert effective_status(_card(12, 2030, "cancelled"), after) == "cancelled"
    assert effective_status(_card(12, 2030, "blocked"), _at(2030, 12, 31)) == "blocked"
