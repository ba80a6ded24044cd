"""Cards through the HTTP API: issue, manage, pay, refund."""

import http.client
import json
import threading
import uuid
from datetime import datetime, timezone

import pytest

from hoardrun import ledger
from hoardrun.models import Account, AuditLog, Card, Transaction
from hoardrun.security import TEST_BIN, is_luhn_valid
from tests.integration.conftest import LiveServer

API = "/api/v1"


# --------------------------------------------------------------------------
# Helpers

def open_account(client, person, type="checking", currency="USD", deposit=None):
    result = client.simulate_post(f"{API}/accounts", headers=person.headers,
                                  json={"type": type, "currency": currency, "name": "Main"})
    assert result.status_code == 201, result.text
    account_id = result.json["id"]
    if deposit:
        result = client.simulate_post(f"{API}/accounts/{account_id}/deposits",
                                      headers=person.headers, json={"amount": deposit})
        assert result.status_code == 201, result.text
    return account_id


def issue(client, person, account, **body):
    body = {"account_id": account, "type": "debit", "cardholder_name": "Jane Doe", **body}
    return client.simulate_post(f"{API}/cards", headers=person.headers, json=body)


def pay(client, person, card_id, amount="10.00", key=None, **body):
    body = {"merchant_name": "Corner Shop", "merchant_category": "5411", "amount": amount,
            "currency": "USD", "channel": "chip", **body}
    headers = dict(person.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.simulate_post(f"{API}/cards/{card_id}/payments", headers=headers, json=body)


def refund(client, person, card_id, payment_id, amount, key=None):
    headers = dict(person.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.simulate_post(f"{API}/cards/{card_id}/payments/{payment_id}/refunds",
                                headers=headers, json={"amount": amount})


def problem(result, status, code):
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == "application/problem+json"
    assert result.json["type"].endswith("/" + code), result.json
    return result.json


def balance(client, person, account_id):
    result = client.simulate_get(f"{API}/accounts/{account_id}", headers=person.headers)
    return result.json["balance"]


@pytest.fixture
def account(client, jane):
    return open_account(client, jane, deposit="1000.00")


@pytest.fixture
def card(client, jane, account):
    result = issue(client, jane, account)
    assert result.status_code == 201, result.text
    return result.json


# --------------------------------------------------------------------------
# Issue and read

def test_issue_shows_the_full_number_once_and_masked_ever_after(client, jane, account):
    result = issue(client, jane, account, type="prepaid", cardholder_name="  Jane   Doe ")
    assert result.status_code == 201, result.text
    body = result.json
    number = body["number"]
    assert number.startswith(TEST_BIN) and len(number) == 16 and is_luhn_valid(number)
    assert body["masked_number"] == "**** **** **** " + number[-4:]
    assert body["last_four"] == number[-4:]
    assert body["type"] == "prepaid" and body["status"] == "active"
    assert body["cardholder_name"] == "Jane Doe"
    assert (body["daily_limit"], body["monthly_limit"], body["currency"]) == \
        ("1000.00", "5000.00", "USD")
    assert (body["online_enabled"], body["contactless_enabled"],
            body["international_enabled"]) == (True, True, False)
    now = datetime.now(timezone.utc)
    assert (body["expiry_month"], body["expiry_year"]) == (now.month, now.year + 3)
    assert result.headers["location"] == f"{API}/cards/{body['id']}"
    assert result.headers["cache-control"] == "no-store"
    assert not any("cvv" in key.lower() or "cvc" in key.lower() for key in body)

    one = client.simulate_get(f"{API}/cards/{body['id']}", headers=jane.headers)
    listed = client.simulate_get(f"{API}/cards", headers=jane.headers)
    assert one.status_code == 200 and listed.status_code == 200
    assert "number" not in one.json and number not in one.text and number not in listed.text
    assert one.json["masked_number"] == body["masked_number"]
    assert [c["id"] for c in listed.json["items"]] == [body["id"]]


def test_cards_list_newest_first_in_pages(client, jane, account):
    ids = [issue(client, jane, account).json["id"] for _ in range(3)]
    first = client.simulate_get(f"{API}/cards", params={"limit": 2}, headers=jane.headers)
    assert [c["id"] for c in first.json["items"]] == ids[::-1][:2]
    second = client.simulate_get(f"{API}/cards", headers=jane.headers,
                                 params={"limit": 2, "cursor": first.json["next_cursor"]})
    assert [c["id"] for c in second.json["items"]] == ids[:1]
    assert second.json["next_cursor"] is None


@pytest.mark.parametrize("body, status, field", [
    ({"type": "credit"}, 422, "type"),
    ({"cardholder_name": "Jane 4000"}, 422, "cardholder_name"),
    ({"cardholder_name": "J"}, 422, "cardholder_name"),
    ({"cvv": "123"}, 422, "cvv"),
    ({"account_id": str(uuid.uuid4())}, 404, "account_id"),
])
def test_issue_refusals(client, jane, account, body, status, field):
    result = issue(client, jane, account, **body)
    assert result.status_code == status, result.text
    assert any(field in e["field"] for e in result.json.get("errors", [{"field": field}]))
    assert Card.select().count() == 0


def test_cards_are_issued_on_spending_accounts_that_are_mine_and_open(client, jane, make_user):
    brokerage = open_account(client, jane, type="investment")
    problem(issue(client, jane, brokerage), 422, "validation-error")
    other = make_user()
    theirs = open_account(client, other)
    problem(issue(client, jane, theirs), 404, "not-found")
    mine = open_account(client, jane)
    Account.update(status="suspended").where(Account.id == mine).execute()
    problem(issue(client, jane, mine), 422, "account-not-active")
    assert Card.select().count() == 0


def test_every_card_route_needs_a_token(client, card):
    for method, path in (("GET", "/cards"), ("GET", f"/cards/{card['id']}"),
                         ("POST", f"/cards/{card['id']}/freeze")):
        result = client.simulate_request(method, API + path)
        problem(result, 401, "unauthorized")


# --------------------------------------------------------------------------
# Ownership

def test_another_users_card_is_not_found_on_every_route(client, jane, card, make_user):
    eve = make_user()
    open_account(client, eve, deposit="100.00")
    paid = pay(client, jane, card["id"])
    assert paid.status_code == 201
    card_url = f"{API}/cards/{card['id']}"
    attempts = [
        client.simulate_get(card_url, headers=eve.headers),
        client.simulate_post(f"{card_url}/freeze", headers=eve.headers),
        client.simulate_post(f"{card_url}/unfreeze", headers=eve.headers),
        client.simulate_post(f"{card_url}/cancel", headers=eve.headers),
        client.simulate_patch(f"{card_url}/limits", headers=eve.headers,
                              json={"daily_limit": "1.00"}),
        client.simulate_patch(f"{card_url}/controls", headers=eve.headers,
                              json={"online_enabled": False}),
        pay(client, eve, card["id"]),
        refund(client, eve, card["id"], paid.json["id"], "1.00"),
    ]
    for result in attempts:
        problem(result, 404, "not-found")
    assert client.simulate_get(f"{API}/cards", headers=eve.headers).json["items"] == []
    after = client.simulate_get(card_url, headers=jane.headers).json
    assert after["status"] == "active" and after["daily_limit"] == "1000.00"
    assert balance(client, jane, card["account_id"]) == "990.00"


# --------------------------------------------------------------------------
# Managing a card

def test_freeze_refuses_payments_until_unfrozen_and_is_audited(client, jane, card):
    url = f"{API}/cards/{card['id']}"
    frozen = client.simulate_post(f"{url}/freeze",
                                  headers={**jane.headers, "X-Request-ID": "freeze-1"})
    assert frozen.status_code == 200 and frozen.json["status"] == "blocked"
    problem(pay(client, jane, card["id"]), 422, "card-not-active")
    assert client.simulate_post(f"{url}/freeze", headers=jane.headers).json["status"] == \
        "blocked"
    thawed = client.simulate_post(f"{url}/unfreeze", headers=jane.headers)
    assert thawed.json["status"] == "active"
    assert pay(client, jane, card["id"]).status_code == 201

    rows = list(AuditLog.select().where(AuditLog.entity_id == card["id"])
                .order_by(AuditLog.created_at))
    actions = [r.action for r in rows]
    assert actions == ["card.issue", "card.freeze", "card.unfreeze", "card.payment"]
    freeze_row = rows[1]
    assert freeze_row.request_id == "freeze-1" and freeze_row.actor_id == jane.id
    assert json.loads(freeze_row.before)["status"] == "active"
    assert json.loads(freeze_row.after)["status"] == "blocked"


def test_limits_need_monthly_at_least_daily_and_both_above_zero(client, jane, card):
    url = f"{API}/cards/{card['id']}/limits"
    for body, field in (({"daily_limit": "6000.00"}, "monthly_limit"),
                        ({"daily_limit": "50.00", "monthly_limit": "49.99"}, "monthly_limit"),
                        ({"daily_limit": "0"}, "daily_limit"),
                        ({"monthly_limit": "-5.00"}, "monthly_limit"),
                        ({"daily_limit": "1.001"}, "daily_limit"),
                        ({}, "body")):
        result = client.simulate_patch(url, headers=jane.headers, json=body)
        assert result.status_code == 422, result.text
        assert result.json["errors"][0]["field"] == field, result.json
    stored = client.simulate_get(f"{API}/cards/{card['id']}", headers=jane.headers).json
    assert (stored["daily_limit"], stored["monthly_limit"]) == ("1000.00", "5000.00")

    result = client.simulate_patch(url, headers=jane.headers,
                                   json={"daily_limit": "25.00", "monthly_limit": "100.00"})
    assert result.status_code == 200
    assert (result.json["daily_limit"], result.json["monthly_limit"]) == ("25.00", "100.00")
    assert pay(client, jane, card["id"], "20.00").status_code == 201
    body = problem(pay(client, jane, card["id"], "5.01"), 422, "daily-limit-exceeded")
    assert "daily" in body["detail"]
    assert pay(client, jane, card["id"], "5.00").status_code == 201


def test_channel_toggles_decide_which_payments_go_through(client, jane, card):
    url = f"{API}/cards/{card['id']}/controls"
    problem(pay(client, jane, card["id"], international=True), 422, "channel-disabled")
    result = client.simulate_patch(url, headers=jane.headers,
                                   json={"online_enabled": False, "contactless_enabled": False})
    assert result.status_code == 200
    assert (result.json["online_enabled"], result.json["contactless_enabled"]) == (False, False)
    problem(pay(client, jane, card["id"], channel="online"), 422, "channel-disabled")
    problem(pay(client, jane, card["id"], channel="contactless"), 422, "channel-disabled")
    assert pay(client, jane, card["id"], channel="chip").status_code == 201
    client.simulate_patch(url, headers=jane.headers,
                          json={"online_enabled": True, "international_enabled": True})
    assert pay(client, jane, card["id"], channel="online", international=True).status_code == 201
    problem(client.simulate_patch(url, headers=jane.headers, json={}), 422, "validation-error")
    problem(pay(client, jane, card["id"], channel="atm"), 422, "validation-error")


def test_cancel_is_final(client, jane, card):
    url = f"{API}/cards/{card['id']}"
    cancelled = client.simulate_post(f"{url}/cancel", headers=jane.headers)
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    problem(client.simulate_post(f"{url}/unfreeze", headers=jane.headers), 422,
            "card-not-active")
    problem(client.simulate_post(f"{url}/freeze", headers=jane.headers), 422, "card-not-active")
    problem(client.simulate_patch(f"{url}/limits", headers=jane.headers,
                                  json={"daily_limit": "10.00"}), 422, "card-not-active")
    problem(client.simulate_patch(f"{url}/controls", headers=jane.headers,
                                  json={"online_enabled": False}), 422, "card-not-active")
    problem(pay(client, jane, card["id"]), 422, "card-not-active")
    # A retried cancel is harmless.
    again = client.simulate_post(f"{url}/cancel", headers=jane.headers)
    assert again.status_code == 200 and again.json["status"] == "cancelled"
    assert client.simulate_get(url, headers=jane.headers).json["status"] == "cancelled"


def test_an_expired_card_shows_expired_and_cannot_pay(client, jane, card):
    # Valid through the last day of December 2020.
    Card.update(expiry_month=12, expiry_year=2020).where(Card.id == card["id"]).execute()
    shown = client.simulate_get(f"{API}/cards/{card['id']}", headers=jane.headers).json
    assert shown["status"] == "expired"
    problem(pay(client, jane, card["id"]), 422, "card-expired")


# --------------------------------------------------------------------------
# Payments and refunds

def test_payment_debits_the_account_once_per_idempotency_key(client, jane, card):
    first = pay(client, jane, card["id"], "12.34", key="pay-1", merchant_name="Bakery")
    assert first.status_code == 201, first.text
    body = first.json
    assert (body["amount"], body["currency"], body["balance_after"]) == \
        ("12.34", "USD", "987.66")
    assert (body["merchant_name"], body["merchant_category"], body["channel"]) == \
        ("Bakery", "5411", "chip")
    assert first.headers["location"] == f"{API}/transactions/{body['id']}"

    replay = pay(client, jane, card["id"], "12.34", key="pay-1", merchant_name="Bakery")
    assert replay.status_code == 201 and replay.json == body
    assert replay.headers["idempotent-replayed"] == "true"
    problem(pay(client, jane, card["id"], "99.00", key="pay-1"), 422, "idempotency-key-reused")
    assert balance(client, jane, card["account_id"]) == "987.66"

    entry = Transaction.get_by_id(uuid.UUID(body["id"]))
    assert (entry.type, entry.direction, entry.amount) == ("payment", "outbound", 1234)
    assert str(entry.card_id) == card["id"] and entry.merchant_name == "Bakery"
    shown = client.simulate_get(first.headers["location"], headers=jane.headers)
    assert shown.status_code == 200, shown.text
    assert ledger.verify() == []


def test_refused_payment_is_replayed_and_moves_nothing(client, jane, card):
    client.simulate_post(f"{API}/cards/{card['id']}/freeze", headers=jane.headers)
    first = pay(client, jane, card["id"], key="frozen-1")
    problem(first, 422, "card-not-active")
    client.simulate_post(f"{API}/cards/{card['id']}/unfreeze", headers=jane.headers)
    # The first answer stands for this key; a new key pays.
    replay = pay(client, jane, card["id"], key="frozen-1")
    assert replay.status_code == 422 and replay.json == first.json
    assert pay(client, jane, card["id"], key="frozen-2").status_code == 201
    assert balance(client, jane, card["account_id"]) == "990.00"


def test_payment_refusals_for_money(client, jane, card):
    client.simulate_patch(f"{API}/cards/{card['id']}/limits", headers=jane.headers,
                          json={"daily_limit": "2000.00"})
    problem(pay(client, jane, card["id"], "1000.01"), 422, "insufficient-funds")
    problem(pay(client, jane, card["id"], "10.00", currency="EUR"), 422, "currency-mismatch")
    problem(pay(client, jane, card["id"], "0.00"), 422, "invalid-amount")
    problem(pay(client, jane, card["id"], "1.001"), 422, "invalid-amount")
    problem(pay(client, jane, card["id"], "1e3"), 422, "invalid-amount")
    result = client.simulate_post(f"{API}/cards/{card['id']}/payments",
                                  headers={**jane.headers, "Content-Type": "application/json"},
                                  body=json.dumps({"merchant_name": "X", "amount": 12.5,
                                                   "merchant_category": "1", "currency": "USD",
                                                   "channel": "chip"}))
    problem(result, 422, "validation-error")
    assert balance(client, jane, card["account_id"]) == "1000.00"
    assert Transaction.select().where(Transaction.card == card["id"]).count() == 0


def test_monthly_limit_counts_earlier_days_of_the_month(client, jane, card):
    url = f"{API}/cards/{card['id']}/limits"
    client.simulate_patch(url, headers=jane.headers,
                          json={"daily_limit": "50.00", "monthly_limit": "60.00"})
    now = datetime.now(timezone.utc)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # A payment on the 1st of this month, written as the ledger writes one
    # (entries are insert-only, so it cannot be back-dated any other way).
    Transaction.insert(id=uuid.uuid4(), account=card["account_id"], movement_id=uuid.uuid4(),
                       type="payment", direction="outbound", amount=4_000, currency="USD",
                       balance_after=96_000, card=card["id"],
                       reference="E" + uuid.uuid4().hex, created_at=month_start).execute()
    # On the 1st that payment is also today's, so the daily limit speaks first.
    code = "daily-limit-exceeded" if now.day == 1 else "monthly-limit-exceeded"
    problem(pay(client, jane, card["id"], "25.00"), 422, code)
    assert pay(client, jane, card["id"], "10.00" if now.day == 1 else "20.00").status_code == 201


def test_refunds_add_up_to_the_payment_at_most(client, jane, card, make_user):
    paid = pay(client, jane, card["id"], "30.00").json
    first = refund(client, jane, card["id"], paid["id"], "10.00", key="r-1")
    assert first.status_code == 201, first.text
    assert (first.json["amount"], first.json["refunded_total"], first.json["payment_id"]) == \
        ("10.00", "10.00", paid["id"])
    assert first.json["balance_after"] == "980.00"
    replay = refund(client, jane, card["id"], paid["id"], "10.00", key="r-1")
    assert replay.json == first.json and replay.headers["idempotent-replayed"] == "true"
    body = problem(refund(client, jane, card["id"], paid["id"], "20.01"), 422,
                   "refund-exceeds-payment")
    assert "(20.00 USD left to refund)" in body["detail"], body["detail"]
    last = refund(client, jane, card["id"], paid["id"], "20.00")
    assert last.json["refunded_total"] == "30.00"
    problem(refund(client, jane, card["id"], paid["id"], "0.01"), 422, "refund-exceeds-payment")
    assert balance(client, jane, card["account_id"]) == "1000.00"

    # The payment must be this card's: on another of my cards it is not found.
    other = issue(client, jane, card["account_id"]).json
    problem(refund(client, jane, other["id"], paid["id"], "1.00"), 404, "not-found")
    problem(refund(client, jane, card["id"], str(uuid.uuid4()), "1.00"), 404, "not-found")
    refunds = Transaction.select().where(Transaction.refund_of == uuid.UUID(paid["id"]))
    assert sorted(r.amount for r in refunds) == [1_000, 2_000]
    assert ledger.verify() == []


def test_a_refund_reaches_a_frozen_card(client, jane, card):
    paid = pay(client, jane, card["id"], "15.00").json
    client.simulate_post(f"{API}/cards/{card['id']}/freeze", headers=jane.headers)
    result = refund(client, jane, card["id"], paid["id"], "15.00")
    assert result.status_code == 201, result.text
    assert balance(client, jane, card["account_id"]) == "1000.00"


# --------------------------------------------------------------------------
# Concurrency

@pytest.mark.slow
def test_eight_clients_paying_at_once_never_exceed_the_daily_limit(app, settings, client, jane,
                                                                   card):
    client.simulate_patch(f"{API}/cards/{card['id']}/limits", headers=jane.headers,
                          json={"daily_limit": "50.00"})
    statuses, codes = [], []
    lock = threading.Lock()
    start = threading.Barrier(8)

    with LiveServer(app, settings, threads=8) as server:
        def client_thread(n):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            try:
                start.wait()
                for i in range(3):
                    body = json.dumps({"merchant_name": f"Shop {n}", "merchant_category": "5411",
                                       "amount": "10.00", "currency": "USD",
                                       "channel": "contactless"})
                    conn.request("POST", f"{API}/cards/{card['id']}/payments", body=body,
                                  headers={**jane.headers, "Content-Type": "application/json",
                                           "Idempotency-Key": f"c{n}-{i}"})
                    response = conn.getresponse()
                    answer = json.loads(response.read())
                    with lock:
                        statuses.append(response.status)
                        codes.append(answer.get("type", "").rsplit("/", 1)[-1])
            finally:
                conn.close()

        threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert len(statuses) == 24
    assert statuses.count(201) == 5, (statuses, codes)
    assert statuses.count(422) == 19 and codes.count("daily-limit-exceeded") == 19
    spent = sum(e.amount for e in Transaction.select()
                .where((Transaction.card == card["id"]) & (Transaction.type == "payment")))
    assert spent == 5_000
    assert balance(client, jane, card["account_id"]) == "950.00"
    assert ledger.verify() == []
