"""Investments through the HTTP API: prices, orders, holdings."""

import json
import uuid
from decimal import Decimal

import pytest

from hoardrun import investments, ledger
from hoardrun.models import AuditLog, InstrumentPrice, Investment, Transaction
from tests.integration.test_cards_api import balance, open_account, problem

API = "/api/v1"


def order(client, person, account_id, symbol, side, quantity, key=None):
    headers = dict(person.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.simulate_post(f"{API}/investments/orders", headers=headers, json={
        "account_id": account_id, "symbol": symbol, "side": side, "quantity": quantity})


def set_price(client, admin, symbol, price, **fields):
    return client.simulate_put(f"{API}/admin/prices/{symbol}", headers=admin.headers,
                               json={"price": price, **fields})


@pytest.fixture
def brokerage(client, jane, prices):
    return open_account(client, jane, type="investment", deposit="10000.00")


def holdings(client, person):
    result = client.simulate_get(f"{API}/investments", headers=person.headers)
    assert result.status_code == 200, result.text
    return result.json["items"]


def summary(client, person):
    result = client.simulate_get(f"{API}/investments/summary", headers=person.headers)
    assert result.status_code == 200, result.text
    return result.json["currencies"]


# --------------------------------------------------------------------------
# The price list

def test_default_prices_load_once_and_are_listed(client, jane, prices):
    assert prices == ["AAPL", "MSFT", "VTI", "BTC"]
    assert investments.load_default_prices() == []
    listed = client.simulate_get(f"{API}/prices", headers=jane.headers)
    assert listed.status_code == 200
    assert [(p["symbol"], p["price"], p["currency"]) for p in listed.json["items"]] == [
        ("AAPL", "190.00000000", "USD"), ("BTC", "65000.00000000", "USD"),
        ("MSFT", "420.00000000", "USD"), ("VTI", "260.00000000", "USD")]


def test_only_admins_set_prices_and_every_change_is_audited(client, jane, admin, prices):
    problem(set_price(client, jane, "AAPL", "1.00"), 403, "forbidden")
    problem(client.simulate_put(f"{API}/admin/prices/AAPL", json={"price": "1.00"}), 401,
            "unauthorized")
    updated = set_price(client, admin, "aapl", "191.5")
    assert updated.status_code == 200, updated.text
    assert (updated.json["symbol"], updated.json["price"]) == ("AAPL", "191.50000000")

    created = set_price(client, admin, "ACME", "12.25", name="Acme Corp", type="stock",
                        currency="USD")
    assert created.status_code == 201, created.text
    assert InstrumentPrice.get_by_id("ACME").price == Decimal("12.25")

    problem(set_price(client, admin, "NEWCO", "1.00"), 422, "validation-error")
    problem(set_price(client, admin, "AAPL", "1.00", currency="EUR"), 422, "validation-error")
    problem(set_price(client, admin, "AAPL", "0"), 422, "validation-error")
    problem(set_price(client, admin, "AAPL", "1.123456789"), 422, "validation-error")
    problem(set_price(client, admin, "TOO-LONG-SYMBOL", "1.00", name="X", type="stock",
                      currency="USD"), 422, "validation-error")
    assert InstrumentPrice.get_by_id("AAPL").price == Decimal("191.5")

    rows = list(AuditLog.select().where((AuditLog.action == "price.set")
                                        & (AuditLog.actor == admin.id))
                .order_by(AuditLog.created_at))
    assert [r.entity_id for r in rows] == ["AAPL", "ACME"]
    assert json.loads(rows[0].before)["price"] == "190.00000000"
    assert json.loads(rows[0].after)["price"] == "191.50000000"


# --------------------------------------------------------------------------
# Orders and holdings

def test_buy_revalue_and_sell_through_the_ledger(client, jane, admin, brokerage):
    bought = order(client, jane, brokerage, "aapl", "buy", "0.5")
    assert bought.status_code == 201, bought.text
    b = bought.json
    assert (b["symbol"], b["side"], b["quantity"], b["price"], b["amount"]) == \
        ("AAPL", "buy", "0.50000000", "190.00000000", "95.00")
    assert (b["held_quantity"], b["cost_basis"], b["balance_after"]) == \
        ("0.50000000", "95.00", "9905.00")
    assert bought.headers["location"] == f"{API}/transactions/{b['id']}"
    assert balance(client, jane, brokerage) == "9905.00"

    [h] = holdings(client, jane)
    assert (h["symbol"], h["quantity"], h["average_cost"], h["cost_basis"]) == \
        ("AAPL", "0.50000000", "190.00000000", "95.00")
    assert (h["current_value"], h["unrealised_gain"], h["unrealised_gain_percent"]) == \
        ("95.00", "0.00", "0.00")

    assert set_price(client, admin, "AAPL", "200").status_code == 200
    [h] = holdings(client, jane)
    assert (h["current_price"], h["current_value"], h["unrealised_gain"],
            h["unrealised_gain_percent"]) == ("200.00000000", "100.00", "5.00", "5.26")

    sold = order(client, jane, brokerage, "AAPL", "sell", "0.2")
    assert sold.status_code == 201, sold.text
    assert (sold.json["amount"], sold.json["held_quantity"], sold.json["cost_basis"]) == \
        ("40.00", "0.30000000", "57.00")
    problem(order(client, jane, brokerage, "AAPL", "sell", "0.30000001"), 422,
            "insufficient-holding")
    [h] = holdings(client, jane)
    assert (h["quantity"], h["average_cost"], h["current_value"], h["unrealised_gain"]) == \
        ("0.30000000", "190.00000000", "60.00", "3.00")

    final = order(client, jane, brokerage, "AAPL", "sell", "0.3")
    assert final.json["amount"] == "60.00" and final.json["held_quantity"] == "0.00000000"
    assert holdings(client, jane) == []
    problem(client.simulate_get(f"{API}/investments/{h['id']}", headers=jane.headers), 404,
            "not-found")
    assert balance(client, jane, brokerage) == "10005.00"
    assert ledger.verify() == []

    entries = Transaction.select().where(Transaction.account == uuid.UUID(brokerage))
    assert sorted((e.type, e.amount) for e in entries if e.type != "deposit") == [
        ("investment_buy", 9_500), ("investment_sell", 4_000), ("investment_sell", 6_000)]
    actions = [r.action for r in AuditLog.select().where(AuditLog.actor == jane.id)
               .order_by(AuditLog.created_at) if r.action.startswith("investment.")]
    assert actions == ["investment.buy", "investment.sell", "investment.sell"]


def test_summary_is_the_sum_of_the_holdings_plus_cash(client, jane, admin, brokerage):
    # Buys pay a fraction of a cent in full; holdings are worth what a sale would pay.
    set_price(client, admin, "TIE", "1.25", name="Tie Inc", type="stock", currency="USD")
    assert order(client, jane, brokerage, "TIE", "buy", "0.1").json["amount"] == "0.13"
    order(client, jane, brokerage, "MSFT", "buy", "0.003")      # 1.26
    order(client, jane, brokerage, "BTC", "buy", "0.00012345")  # 8.02425 -> 8.03
    set_price(client, admin, "BTC", "70000.01")
    listed = {h["symbol"]: h for h in holdings(client, jane)}
    assert list(listed) == ["BTC", "MSFT", "TIE"]
    assert listed["TIE"]["current_value"] == "0.12"           # 12.5 cents -> 12
    assert listed["BTC"]["current_value"] == "8.64"           # 8.6415012345
    assert listed["MSFT"]["current_value"] == "1.26"

    [usd] = summary(client, jane)
    total = sum(Decimal(h["current_value"]) for h in listed.values())
    cost = sum(Decimal(h["cost_basis"]) for h in listed.values())
    assert Decimal(usd["current_value"]) == total == Decimal("10.02")
    assert Decimal(usd["cost_basis"]) == cost == Decimal("9.42")
    assert usd["unrealised_gain"] == "0.60" and usd["holdings"] == 3
    assert usd["cash"] == balance(client, jane, brokerage) == "9990.58"
    assert usd["total_value"] == "10000.60"


def test_summary_keeps_currencies_apart(client, jane, admin, brokerage):
    euro = open_account(client, jane, type="investment", currency="EUR", deposit="500.00")
    set_price(client, admin, "SAP", "150.00", name="SAP SE", type="stock", currency="EUR")
    order(client, jane, euro, "SAP", "buy", "2")
    order(client, jane, brokerage, "VTI", "buy", "1")
    totals = {t["currency"]: t for t in summary(client, jane)}
    assert (totals["EUR"]["current_value"], totals["EUR"]["cash"]) == ("300.00", "200.00")
    assert (totals["USD"]["current_value"], totals["USD"]["cash"]) == ("260.00", "9740.00")
    problem(order(client, jane, euro, "VTI", "buy", "1"), 422, "currency-mismatch")


@pytest.mark.parametrize("quantity, code", [
    ("0", "validation-error"),
    ("-1", "validation-error"),
    ("1.123456789", "validation-error"),
    ("1e3", "validation-error"),
    ("1000", "insufficient-funds"),
])
def test_refused_orders_move_nothing(client, jane, brokerage, quantity, code):
    problem(order(client, jane, brokerage, "AAPL", "buy", quantity), 422, code)
    assert balance(client, jane, brokerage) == "10000.00"
    assert Investment.select().count() == 0


def test_orders_need_my_investment_account_and_a_listed_symbol(client, jane, brokerage,
                                                               make_user):
    checking = open_account(client, jane, deposit="100.00")
    problem(order(client, jane, checking, "AAPL", "buy", "0.1"), 422, "not-investment-account")
    problem(order(client, jane, brokerage, "NOPE", "buy", "1"), 404, "not-found")
    eve = make_user()
    problem(order(client, eve, brokerage, "AAPL", "buy", "0.1"), 404, "not-found")
    as_number = json.dumps({"account_id": brokerage, "symbol": "AAPL", "side": "buy",
                            "quantity": 1.5})
    result = client.simulate_post(f"{API}/investments/orders",
                                  headers={**jane.headers, "Content-Type": "application/json"},
                                  body=as_number)
    problem(result, 422, "validation-error")
    problem(order(client, jane, brokerage, "AAPL", "hold", "1"), 422, "validation-error")
    assert Investment.select().count() == 0


def test_an_order_is_placed_once_per_idempotency_key(client, jane, brokerage):
    first = order(client, jane, brokerage, "VTI", "buy", "2", key="buy-vti")
    assert first.status_code == 201, first.text
    replay = order(client, jane, brokerage, "VTI", "buy", "2", key="buy-vti")
    assert replay.status_code == 201 and replay.json == first.json
    assert replay.headers["idempotent-replayed"] == "true"
    problem(order(client, jane, brokerage, "VTI", "buy", "3", key="buy-vti"), 422,
            "idempotency-key-reused")
    [h] = holdings(client, jane)
    assert h["quantity"] == "2.00000000"
    assert balance(client, jane, brokerage) == "9480.00"


def test_another_users_holdings_are_not_found(client, jane, brokerage, make_user):
    bought = order(client, jane, brokerage, "MSFT", "buy", "1").json
    eve = make_user()
    problem(client.simulate_get(f"{API}/investments/{bought['holding_id']}",
                                headers=eve.headers), 404, "not-found")
    assert holdings(client, eve) == [] and summary(client, eve) == []
    mine = client.simulate_get(f"{API}/investments/{bought['holding_id']}",
                               headers=jane.headers)
    assert mine.status_code == 200 and mine.json["symbol"] == "MSFT"
    problem(order(client, eve, brokerage, "MSFT", "sell", "1"), 404, "not-found")
    assert holdings(client, jane)[0]["quantity"] == "1.00000000"


def test_prices_set_task_adds_and_updates_a_price(environ, database, tmp_path):
    from tests.integration.test_database_init import run_task

    added = run_task(environ, "prices.set", "acme", "12.5", "--name", "Acme Corp", "--type",
                     "stock", "--currency", "USD", cwd=tmp_path)
    assert added.code == 0, added.output
    assert added.stdout.strip() == "added ACME: 12.50000000 USD"
    updated = run_task(environ, "prices.set", "ACME", "13", cwd=tmp_path)
    assert updated.stdout.strip() == "updated ACME: 13.00000000 USD"
    refused = run_task(environ, "prices.set", "NEWCO", "1", cwd=tmp_path)
    assert refused.code == 1 and len(refused.error_lines) == 1
    assert "needs a name" in refused.error_lines[0]
    assert InstrumentPrice.get_by_id("ACME").price == Decimal("13")
    assert InstrumentPrice.select().count() == 1
    assert AuditLog.select().where(AuditLog.action == "price.set").count() == 2
