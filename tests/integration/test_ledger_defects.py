"""Issue 16 items 1-7 and issue 11 item 5, replayed over HTTP exactly as reported.

Each test is the reporter's sequence of requests; it failed before migration
004 and the fixes that came with it.
"""

from decimal import Decimal

import pytest

from hoardrun import ledger
from hoardrun.db import db
from money_helpers import (API, deposit, get_account, ok, open_account, pay, post_money,
                           problem, random_id, transfer)

ADMIN = f"{API}/admin"


def reverse(client, admin, entry_id):
    return client.simulate_post(f"{ADMIN}/transactions/{entry_id}/reverse",
                                headers=admin.headers, json={})


def freeze(client, admin, account_id):
    ok(client.simulate_post(f"{ADMIN}/accounts/{account_id}/freeze", headers=admin.headers,
                            json={}), 200)


def balance(client, person, account_id):
    return get_account(client, person, account_id)["balance"]


def issue_card(client, person, account_id):
    return ok(client.simulate_post(f"{API}/cards", headers=person.headers, json={
        "account_id": account_id, "type": "debit", "cardholder_name": "Jane Doe"}), 201)


def card_pay(client, person, card_id, amount):
    return ok(client.simulate_post(f"{API}/cards/{card_id}/payments", headers=person.headers,
                                   json={"merchant_name": "Corner Shop",
                                         "merchant_category": "5411", "amount": amount,
                                         "currency": "USD", "channel": "chip"}), 201)


def card_refund(client, person, card_id, payment_id, amount):
    return client.simulate_post(f"{API}/cards/{card_id}/payments/{payment_id}/refunds",
                                headers=person.headers, json={"amount": amount})


def order(client, person, account_id, symbol, side, quantity):
    return client.simulate_post(f"{API}/investments/orders", headers=person.headers, json={
        "account_id": account_id, "symbol": symbol, "side": side, "quantity": quantity})


def set_price(client, admin, symbol, price, **fields):
    ok(client.simulate_put(f"{ADMIN}/prices/{symbol}", headers=admin.headers,
                           json={"price": price, **fields}), 200 if not fields else 201)


def holdings(client, person):
    return ok(client.simulate_get(f"{API}/investments", headers=person.headers), 200)["items"]


@pytest.fixture
def card_account(client, jane):
    account = open_account(client, jane)
    deposit(client, jane, account["id"], "1000.00")
    return account["id"]


@pytest.fixture
def card(client, jane, card_account):
    return issue_card(client, jane, card_account)


# --------------------------------------------------------------------------
# 1. A card payment can be paid back twice

def test_a_reversed_card_payment_cannot_be_refunded(client, jane, admin, card, card_account):
    paid = card_pay(client, jane, card["id"], "60.00")
    ok(reverse(client, admin, paid["id"]), 200)
    assert balance(client, jane, card_account) == "1000.00"

    problem(card_refund(client, jane, card["id"], paid["id"], "60.00"), 422, "payment-reversed")
    assert balance(client, jane, card_account) == "1000.00"
    assert ledger.verify() == []


def test_a_refunded_card_payment_cannot_be_reversed(client, jane, admin, card, card_account):
    paid = card_pay(client, jane, card["id"], "60.00")
    ok(card_refund(client, jane, card["id"], paid["id"], "60.00"), 201)
    assert balance(client, jane, card_account) == "1000.00"

    problem(reverse(client, admin, paid["id"]), 422, "reversal-not-allowed")
    assert balance(client, jane, card_account) == "1000.00"
    assert ledger.verify() == []


def test_a_reversal_gives_back_only_what_refunds_did_not(client, jane, admin, card,
                                                         card_account):
    paid = card_pay(client, jane, card["id"], "60.00")
    ok(card_refund(client, jane, card["id"], paid["id"], "20.00"), 201)
    entries = ok(reverse(client, admin, paid["id"]), 200)["entries"]
    assert {e["amount"] for e in entries} == {"40.00"}
    assert balance(client, jane, card_account) == "1000.00"
    problem(card_refund(client, jane, card["id"], paid["id"], "0.01"), 422, "payment-reversed")
    assert balance(client, jane, card_account) == "1000.00"
    assert ledger.verify() == []


def test_a_reversed_refund_gave_nothing_back(client, jane, admin, card, card_account):
    paid = card_pay(client, jane, card["id"], "60.00")
    refunded = ok(card_refund(client, jane, card["id"], paid["id"], "60.00"), 201)
    ok(reverse(client, admin, refunded["id"]), 200)
    assert balance(client, jane, card_account) == "940.00"
    # Reversing the payment now gives the whole 60.00 back, once.
    entries = ok(reverse(client, admin, paid["id"]), 200)["entries"]
    assert {e["amount"] for e in entries} == {"60.00"}
    assert balance(client, jane, card_account) == "1000.00"
    problem(card_refund(client, jane, card["id"], paid["id"], "60.00"), 422, "payment-reversed")
    assert ledger.verify() == []


def test_a_refund_stays_once_its_payment_was_reversed(client, jane, admin, card, card_account):
    """Found by attacking the API: the same three steps gave two balances, by their order."""
    paid = card_pay(client, jane, card["id"], "30.00")
    refunded = ok(card_refund(client, jane, card["id"], paid["id"], "10.00"), 201)
    entries = ok(reverse(client, admin, paid["id"]), 200)["entries"]
    assert {e["amount"] for e in entries} == {"20.00"}  # what the refund had not given back
    assert balance(client, jane, card_account) == "1000.00"
    # Taking the refund back now would make a fully reversed payment cost 10.00.
    body = problem(reverse(client, admin, refunded["id"]), 422, "reversal-not-allowed")
    assert "reversed" in body["detail"]
    assert balance(client, jane, card_account) == "1000.00"
    assert ledger.verify() == []


# --------------------------------------------------------------------------
# 2. Reversing an investment order moves only the cash

@pytest.mark.parametrize("side", ["buy", "sell"])
def test_an_investment_order_cannot_be_reversed(client, jane, admin, prices, side):
    brokerage = open_account(client, jane, type="investment")["id"]
    deposit(client, jane, brokerage, "1000.00")
    bought = ok(order(client, jane, brokerage, "AAPL", "buy", "1"), 201)
    placed = bought if side == "buy" else ok(order(client, jane, brokerage, "AAPL", "sell",
                                                   "0.5"), 201)
    before = balance(client, jane, brokerage), holdings(client, jane)

    problem(reverse(client, admin, placed["id"]), 422, "reversal-not-allowed")
    # Nor through the settlement side of the order.
    problem(reverse(client, admin, _other_entry(placed["id"])), 422, "reversal-not-allowed")
    assert (balance(client, jane, brokerage), holdings(client, jane)) == before
    assert ledger.verify() == []


def _other_entry(entry_id):
    row = db.execute_sql(
        "SELECT o.id FROM transactions t JOIN transactions o ON o.movement_id = t.movement_id "
        "AND o.id <> t.id WHERE t.id = %s", (entry_id,)).fetchone()
    return row[0]


def test_verify_checks_holdings_against_their_trades(client, jane, prices):
    brokerage = open_account(client, jane, type="investment")["id"]
    deposit(client, jane, brokerage, "1000.00")
    ok(order(client, jane, brokerage, "AAPL", "buy", "2"), 201)
    ok(order(client, jane, brokerage, "AAPL", "sell", "0.5"), 201)
    assert ledger.verify() == []

    # A share from nothing (what a cash-only reversal of a buy used to leave).
    db.execute_sql("UPDATE investments SET quantity = quantity + 1 WHERE account_id = %s",
                   (brokerage,))
    [found] = ledger.verify()
    assert found.startswith("holding ") and "quantity 2.5" in found and "net 1.5" in found


# --------------------------------------------------------------------------
# 3. A refund lands in a frozen account

def test_a_refund_into_a_frozen_account_is_refused(client, jane, admin, card, card_account):
    paid = card_pay(client, jane, card["id"], "60.00")
    freeze(client, admin, card_account)

    problem(card_refund(client, jane, card["id"], paid["id"], "60.00"), 422,
            "account-not-active")
    assert balance(client, jane, card_account) == "940.00"


# --------------------------------------------------------------------------
# 4. Rounding can be farmed

def test_rounding_favours_the_house_so_it_cannot_be_farmed(client, jane, prices):
    brokerage = open_account(client, jane, type="investment")["id"]
    deposit(client, jane, brokerage, "1.00")
    for _ in range(3):
        # 0.00000023 BTC at 65,000 is 0.01495: a buy pays it as 0.02.
        assert ok(order(client, jane, brokerage, "BTC", "buy", "0.00000023"),
                  201)["amount"] == "0.02"
        # Each lot of 0.00000008 is worth 0.0052: a sell pays nothing for it.
        for _lot in range(2):
            problem(order(client, jane, brokerage, "BTC", "sell", "0.00000008"), 422,
                    "order-too-small")
        # A holding is worth what selling it pays (both rounded down).
        [held] = holdings(client, jane)
        sold = ok(order(client, jane, brokerage, "BTC", "sell", "0.00000023"), 201)
        assert sold["amount"] == held["current_value"] == "0.01"
    assert balance(client, jane, brokerage) == "0.97"
    assert ledger.verify() == []


# --------------------------------------------------------------------------
# 5. Closing strands assets

def close(client, person, account_id):
    return client.simulate_post(f"{API}/accounts/{account_id}/close", headers=person.headers,
                                json={})


def test_an_account_holding_shares_cannot_be_closed(client, jane, prices):
    brokerage = open_account(client, jane, type="investment")["id"]
    deposit(client, jane, brokerage, "190.00")
    ok(order(client, jane, brokerage, "AAPL", "buy", "1"), 201)
    assert balance(client, jane, brokerage) == "0.00"

    body = problem(close(client, jane, brokerage), 422, "account-not-empty")
    assert "AAPL" in body["detail"]
    assert get_account(client, jane, brokerage)["status"] == "active"
    ok(order(client, jane, brokerage, "AAPL", "sell", "1"), 201)


def test_closing_an_account_cancels_its_cards(client, jane):
    account = open_account(client, jane)["id"]
    card = issue_card(client, jane, account)
    ok(close(client, jane, account), 200)
    shown = ok(client.simulate_get(f"{API}/cards/{card['id']}", headers=jane.headers), 200)
    assert shown["status"] == "cancelled"


def test_closing_the_primary_account_promotes_another_active_one(client, jane, make_user):
    primary = open_account(client, jane, name="First")
    closed_first = open_account(client, jane, name="Second")
    other = open_account(client, jane, name="Third")
    assert primary["is_primary"]
    ok(close(client, jane, closed_first["id"]), 200)
    ok(close(client, jane, primary["id"]), 200)
    assert get_account(client, jane, other["id"])["is_primary"] is True

    john = make_user()
    source = open_account(client, john)["id"]
    deposit(client, john, source, "20.00")
    pay(client, john, jane, "12.50")
    assert balance(client, jane, other["id"]) == "12.50"


# --------------------------------------------------------------------------
# 6. A reversed transfer or P2P payment still says completed

def test_a_reversed_transfer_says_so_and_links_its_reversal(client, jane, admin):
    a = open_account(client, jane, name="A")["id"]
    b = open_account(client, jane, name="B")["id"]
    deposit(client, jane, a, "100.00")
    made = transfer(client, jane, a, b, "30.00")
    [out_entry] = [e for e in ok(client.simulate_get(f"{API}/accounts/{a}/transactions",
                                                     headers=jane.headers), 200)["items"]
                   if e["type"] == "transfer_out"]
    entries = ok(reverse(client, admin, out_entry["id"]), 200)["entries"]

    shown = ok(client.simulate_get(f"{API}/transfers/{made['id']}", headers=jane.headers), 200)
    assert shown["status"] == "reversed"
    back = next(e for e in entries if e["account_id"] == a)
    assert shown["reversal"]["transaction_id"] == back["id"]
    assert shown["reversal"]["movement_id"] == back["movement_id"]
    entry = ok(client.simulate_get(f"{API}/transactions/{back['id']}", headers=jane.headers),
               200)
    assert (entry["type"], entry["reverses_id"]) == ("reversal", out_entry["id"])
    listed = ok(client.simulate_get(f"{API}/transfers", headers=jane.headers,
                                    params={"status": "reversed"}), 200)["items"]
    assert listed == [shown]
    assert ledger.verify() == []


def test_a_reversed_p2p_payment_says_so_to_both_sides(client, jane, admin, make_user):
    john = make_user()
    source = open_account(client, john)["id"]
    target = open_account(client, jane)["id"]
    deposit(client, john, source, "50.00")
    paid = pay(client, john, jane, "12.50")
    [received] = [e for e in ok(client.simulate_get(f"{API}/accounts/{target}/transactions",
                                                    headers=jane.headers), 200)["items"]
                  if e["type"] == "p2p_in"]
    entries = ok(reverse(client, admin, received["id"]), 200)["entries"]

    for person, account in ((john, source), (jane, target)):
        shown = ok(client.simulate_get(f"{API}/p2p/{paid['id']}", headers=person.headers), 200)
        mine = next(e for e in entries if e["account_id"] == account)
        assert shown["status"] == "reversed"
        assert shown["reversal"]["transaction_id"] == mine["id"]
        [listed] = ok(client.simulate_get(f"{API}/p2p", headers=person.headers), 200)["items"]
        assert listed == shown
    assert ledger.verify() == []


# --------------------------------------------------------------------------
# 7. Another user's account is discoverable through a transfer

def _without_request_id(body):
    return {k: v for k, v in body.items() if k != "request_id"}


@pytest.mark.parametrize("currency, amount, frozen", [
    ("JPY", "1.00", False),    # was 422 currency-mismatch: USD / JPY
    ("USD", "500.00", False),  # was 422 insufficient-funds
    ("USD", "1.00", True),     # was 422 account-not-active
])
def test_another_users_account_looks_missing_to_a_transfer(client, jane, make_user, admin,
                                                           currency, amount, frozen):
    mine = open_account(client, jane)["id"]
    deposit(client, jane, mine, "10.00")
    theirs = open_account(client, make_user(), currency=currency)["id"]
    if frozen:
        freeze(client, admin, theirs)

    def attempt(to_id):
        return post_money(client, jane, "/transfers", {
            "from_account_id": mine, "to_account_id": to_id, "amount": amount})

    foreign = problem(attempt(theirs), 404, "not-found")
    missing = problem(attempt(random_id()), 404, "not-found")
    assert _without_request_id(foreign) == _without_request_id(missing)
    assert balance(client, jane, mine) == "10.00"


def test_another_users_account_looks_missing_to_a_p2p_payment(client, jane, make_user):
    john = make_user()
    open_account(client, john)
    theirs = open_account(client, make_user())["id"]
    mine = open_account(client, jane)["id"]
    deposit(client, jane, mine, "10.00")

    def attempt(from_id):
        return post_money(client, jane, "/p2p", {"recipient_email": john.email,
                                                 "from_account_id": from_id, "amount": "1.00"})

    foreign = problem(attempt(theirs), 404, "not-found")
    missing = problem(attempt(random_id()), 404, "not-found")
    assert _without_request_id(foreign) == _without_request_id(missing)


# --------------------------------------------------------------------------
# Issue 11.5: one time source per movement; one cap on every amount

def test_a_transfer_201_body_is_what_get_shows(client, jane):
    a = open_account(client, jane, name="A")["id"]
    b = open_account(client, jane, name="B")["id"]
    deposit(client, jane, a, "100.00")
    made = transfer(client, jane, a, b, "30.00", description="Rent")
    shown = ok(client.simulate_get(f"{API}/transfers/{made['id']}", headers=jane.headers), 200)
    assert made == shown
    [out] = [e for e in ok(client.simulate_get(f"{API}/accounts/{a}/transactions",
                                               headers=jane.headers), 200)["items"]
             if e["type"] == "transfer_out"]
    assert out["created_at"] == made["created_at"] == made["completed_at"]


def test_a_p2p_201_body_is_what_get_shows(client, jane, make_user):
    john = make_user()
    open_account(client, john)
    source = open_account(client, jane)["id"]
    deposit(client, jane, source, "100.00")
    paid = pay(client, jane, john, "12.50", note="Lunch")
    shown = ok(client.simulate_get(f"{API}/p2p/{paid['id']}", headers=jane.headers), 200)
    assert paid == shown
    [listed] = ok(client.simulate_get(f"{API}/p2p", headers=jane.headers), 200)["items"]
    assert listed == paid


def test_a_trade_cash_leg_is_capped_at_the_largest_amount(client, jane, admin, prices):
    brokerage = open_account(client, jane, type="investment")["id"]
    deposit(client, jane, brokerage, "1000.00")
    set_price(client, admin, "BIG", "1.00", name="Big Corp", type="stock", currency="USD")
    ok(order(client, jane, brokerage, "BIG", "buy", "1000"), 201)
    # 1000 x 2e10 = 2e13 dollars: 2e15 cents, above the 1e15 cap (and far below BIGINT).
    set_price(client, admin, "BIG", "20000000000")
    body = problem(order(client, jane, brokerage, "BIG", "sell", "1000"), 422, "invalid-amount")
    assert "too large" in body["detail"]
    assert balance(client, jane, brokerage) == "0.00"
    # A buy above the cap says the same, not insufficient-funds.
    problem(order(client, jane, brokerage, "BIG", "buy", "60000"), 422, "invalid-amount")
    assert Decimal(holdings(client, jane)[0]["quantity"]) == 1000
    assert ledger.verify() == []
