"""Money as a user or admin sees it: decimal strings in the account's currency, never minor units.

Problem details, the audit log served to admins and the defaults a new
card gets all speak the currency's own decimal places (USD 2, JPY 0,
KWD 3): "40.00 USD left", ``"amount": "30.00"``, a daily limit of
150,000 yen rather than 1,000.
"""

import re

import pytest
from money_helpers import API, deposit, ok, open_account, post_money, problem

from hoardrun import audit, cards
from hoardrun.money import CURRENCIES, get_currency

MINOR_UNITS = re.compile(r"minor unit", re.IGNORECASE)


def issue_card(client, person, account_id):
    return ok(client.simulate_post(f"{API}/cards", headers=person.headers, json={
        "account_id": account_id, "type": "debit", "cardholder_name": "Jane Doe"}), 201)


def pay(client, person, card, amount, currency):
    return ok(client.simulate_post(f"{API}/cards/{card['id']}/payments", headers=person.headers,
                                   json={"merchant_name": "Shop", "merchant_category": "5411",
                                         "amount": amount, "currency": currency,
                                         "channel": "chip"}), 201)


def refund(client, person, card, payment_id, amount):
    return client.simulate_post(f"{API}/cards/{card['id']}/payments/{payment_id}/refunds",
                                headers=person.headers, json={"amount": amount})


@pytest.mark.parametrize("currency, paid, first, second, left", [
    ("USD", "60.00", "20.00", "50.00", "40.00 USD"),
    ("KWD", "60.000", "20.500", "50.000", "39.500 KWD"),
    ("JPY", "6000", "2000", "5000", "4000 JPY"),
])
def test_a_refund_over_the_payment_says_what_is_left_in_the_currency(client, jane, currency,
                                                                     paid, first, second, left):
    account = open_account(client, jane, currency)
    deposit(client, jane, account["id"], {"USD": "100.00", "KWD": "100.000",
                                          "JPY": "10000"}[currency])
    card = issue_card(client, jane, account["id"])
    payment = pay(client, jane, card, paid, currency)
    assert refund(client, jane, card, payment["id"], first).status_code == 201

    body = problem(refund(client, jane, card, payment["id"], second), 422,
                   "refund-exceeds-payment")

    assert f"({left} left to refund)" in body["detail"], body["detail"]
    assert not MINOR_UNITS.search(body["detail"])


def test_the_audit_log_shows_every_amount_as_a_decimal_string(client, jane, admin, make_user):
    """Deposit, transfer, P2P, card payment, refund, limits, reversal: all in "30.00" form."""
    main = open_account(client, jane, "USD")
    savings = open_account(client, jane, "USD", "Savings", type="savings")
    john = make_user()
    open_account(client, john, "USD")
    deposit(client, jane, main["id"], "300.00")
    ok(post_money(client, jane, "/transfers", {"from_account_id": main["id"],
                                               "to_account_id": savings["id"],
                                               "amount": "30.00"}), 201)
    ok(post_money(client, jane, "/p2p", {"recipient_email": john.email, "amount": "12.50"}), 201)
    card = issue_card(client, jane, main["id"])
    payment = pay(client, jane, card, "45.00", "USD")
    assert refund(client, jane, card, payment["id"], "5.00").status_code == 201
    ok(client.simulate_patch(f"{API}/cards/{card['id']}/limits", headers=jane.headers,
                             json={"daily_limit": "750.00"}), 200)
    entry = deposit(client, jane, main["id"], "20.00")
    ok(client.simulate_post(f"{API}/admin/transactions/{entry['id']}/reverse",
                            headers=admin.headers, json={"description": "mistake"}), 200)

    rows = ok(client.simulate_get(f"{API}/admin/audit", headers=admin.headers,
                                  params={"limit": 100}), 200)["items"]

    by_action = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
        for state in (row["before"], row["after"]):
            for key, value in (state or {}).items():
                if key in audit.MONEY_KEYS:
                    assert isinstance(value, str), (row["action"], key, value)
                    assert re.fullmatch(r"-?\d+\.\d{2}", value), (row["action"], key, value)
    assert sorted(r["after"]["amount"] for r in by_action["deposit.create"]) == [
        "20.00", "300.00"]
    assert by_action["transfer.create"][0]["after"]["amount"] == "30.00"
    assert by_action["p2p.create"][0]["after"]["amount"] == "12.50"
    assert by_action["card.payment"][0]["after"]["amount"] == "45.00"
    assert (by_action["card.refund"][0]["after"]["amount"],
            by_action["card.refund"][0]["after"]["refunded_total"]) == ("5.00", "5.00")
    limits = by_action["card.limits"][0]
    assert (limits["before"]["daily_limit"], limits["after"]["daily_limit"]) == (
        "1000.00", "750.00")
    assert by_action["transaction.reverse"][0]["after"]["amount"] == "20.00"
    assert by_action["card.issue"][0]["after"]["monthly_limit"] == "5000.00"


def test_holds_and_batches_show_their_amounts_as_decimal_strings_too(client, jane, admin):
    """Found by attacking the API: capture, void and batch rows said 4000 for 40.00."""
    main = open_account(client, jane, "USD")
    savings = open_account(client, jane, "USD", "Savings", type="savings")
    deposit(client, jane, main["id"], "300.00")
    card = issue_card(client, jane, main["id"])
    hold = {"merchant_name": "Hotel", "merchant_category": "7011", "currency": "USD",
            "channel": "chip"}
    captured = ok(post_money(client, jane, f"/cards/{card['id']}/authorizations",
                             {**hold, "amount": "50.00"}), 201)
    voided = ok(post_money(client, jane, f"/cards/{card['id']}/authorizations",
                           {**hold, "amount": "2.00"}), 201)
    ok(post_money(client, jane, f"/authorizations/{captured['id']}/capture",
                  {"amount": "40.00"}), 200)
    ok(client.simulate_post(f"{API}/authorizations/{voided['id']}/void",
                            headers=jane.headers), 200)
    ok(post_money(client, jane, "/payments/batch", {"legs": [
        {"from_account_id": main["id"], "to_account_id": savings["id"], "amount": "1.00"},
        {"from_account_id": main["id"], "to_account_id": savings["id"], "amount": "0.50"}]}),
       201)
    rows = {r["action"]: r["after"] for r in ok(client.simulate_get(
        f"{API}/admin/audit", headers=admin.headers, params={"limit": 100}), 200)["items"]}
    assert (rows["card.capture"]["captured_amount"],
            rows["card.capture"]["released_amount"]) == ("40.00", "10.00")
    assert rows["card.void"]["released_amount"] == "2.00"
    assert [leg["amount"] for leg in rows["batch.create"]["legs"]] == ["1.00", "0.50"]
    assert rows["batch.create"]["currency_totals"] == {"USD": "1.50"}


def test_the_audit_log_uses_each_rows_own_currency(client, jane, admin):
    yen = open_account(client, jane, "JPY", "Yen")
    dinar = open_account(client, jane, "KWD", "Dinar")
    deposit(client, jane, yen["id"], "3000")
    deposit(client, jane, dinar["id"], "3.000")
    rows = ok(client.simulate_get(f"{API}/admin/audit", headers=admin.headers,
                                  params={"action": "deposit.create"}), 200)["items"]
    assert sorted((r["after"]["currency"], r["after"]["amount"]) for r in rows) == [
        ("JPY", "3000"), ("KWD", "3.000")]


@pytest.mark.parametrize("currency, daily, monthly", [
    ("USD", "1000.00", "5000.00"),
    ("EUR", "1000.00", "5000.00"),
    ("JPY", "150000", "750000"),
    ("KRW", "1500000", "7500000"),
    ("KWD", "300.000", "1500.000"),
])
def test_a_new_cards_default_limits_are_set_per_currency(client, jane, currency, daily,
                                                         monthly):
    account = open_account(client, jane, currency)
    card = issue_card(client, jane, account["id"])
    assert (card["daily_limit"], card["monthly_limit"]) == (daily, monthly)


def test_every_currency_has_default_card_limits_worth_roughly_the_same():
    assert set(cards.DEFAULT_DAILY_LIMITS) == set(CURRENCIES)
    for code in CURRENCIES:
        daily, monthly = cards.default_limits(code)
        assert daily > 0 and monthly == daily * cards.MONTHLY_PER_DAILY
        assert daily % get_currency(code).factor == 0  # whole major units
