"""Card authorizations (holds) through HTTP: reserve, capture once, void, expire.

Expiry is tested with a pinned app clock (``create_app(clock=...)``). Holds
live on the app's clock; ledger entries and the funds check inside
``hoardrun_lock_pair`` (withdrawals, transfers, ...) use the database's. A
test that needs a hold expired for every check authorizes it with the clock
pinned in the past, so both clocks agree it has expired.
"""

import http.client
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from falcon import testing

from hoardrun import auth, holds, ledger
from hoardrun.api import create_app
from hoardrun.db import db
from hoardrun.models import Account, CardHold, Transaction
from money_helpers import get_account, ok, open_account, post_money, problem
from tests.integration.conftest import LiveServer

API = "/api/v1"


@pytest.fixture
def app(settings, database, clock):
    return create_app(settings, clock=clock)


@pytest.fixture
def client(app):
    return testing.TestClient(app)


@pytest.fixture
def jane(make_user):
    person = make_user()
    # A token that outlives the longest hold, so a test can move the clock past expiry.
    person.token, _ = auth.issue_token(person.id, ttl=60 * 86400)
    return person


def funded_card(client, person, amount="5000.00", overdraft=0):
    account = open_account(client, person)
    if amount:
        ok(post_money(client, person, f"/accounts/{account['id']}/deposits",
                      {"amount": amount}), 201)
    if overdraft:
        Account.update(overdraft_limit=overdraft).where(Account.id == account["id"]).execute()
    card = ok(client.simulate_post(f"{API}/cards", headers=person.headers, json={
        "account_id": account["id"], "type": "debit", "cardholder_name": "Jane Doe"}), 201)
    return account["id"], card["id"]


def authorize(client, person, card_id, amount="1000.00", key=None, **body):
    body = {"merchant_name": "Grand Hotel", "merchant_category": "7011", "amount": amount,
            "currency": "USD", "channel": "chip", **body}
    return post_money(client, person, f"/cards/{card_id}/authorizations", body, key=key)


def capture(client, person, hold_id, amount=None, key=None):
    body = {} if amount is None else {"amount": amount}
    return post_money(client, person, f"/authorizations/{hold_id}/capture", body, key=key)


def void(client, person, hold_id, key=None):
    headers = dict(person.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.simulate_post(f"{API}/authorizations/{hold_id}/void", headers=headers)


def amounts(client, person, account_id):
    a = get_account(client, person, account_id)
    return a["balance"], a["available_balance"], a["pending_holds"], a["available"]


# --------------------------------------------------------------------------
# The life of a hold


def test_a_hold_lowers_the_available_balance_not_the_balance(client, jane):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "120.00"), 201)
    assert hold["status"] == "active" and hold["amount"] == "120.00"
    assert hold["captured_amount"] is None and hold["payment_id"] is None
    assert amounts(client, jane, account) == ("500.00", "380.00", "120.00", "380.00")
    listed = ok(client.simulate_get(f"{API}/accounts", headers=jane.headers), 200)["items"]
    assert [(a["available_balance"], a["pending_holds"]) for a in listed] == [("380.00",
                                                                              "120.00")]
    assert ok(client.simulate_get(f"{API}/authorizations/{hold['id']}",
                                  headers=jane.headers), 200) == hold
    assert Transaction.select().where(Transaction.card == card).count() == 0
    assert ledger.verify() == []


def test_a_partial_capture_posts_a_payment_and_releases_the_rest(client, jane):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "120.00"), 201)
    captured = ok(capture(client, jane, hold["id"], "95.50"), 200)
    assert captured["status"] == "captured"
    assert (captured["captured_amount"], captured["released_amount"]) == ("95.50", "24.50")
    assert captured["balance_after"] == "404.50"
    assert amounts(client, jane, account) == ("404.50", "404.50", "0.00", "404.50")
    entry = ok(client.simulate_get(f"{API}/transactions/{captured['payment_id']}",
                                   headers=jane.headers), 200)
    assert (entry["type"], entry["amount"], entry["merchant_name"]) == (
        "payment", "95.50", "Grand Hotel")
    # Refundable like any card payment, up to what was captured.
    refund = ok(post_money(client, jane, f"/cards/{card}/payments/{captured['payment_id']}"
                           "/refunds", {"amount": "50.00"}), 201)
    assert refund["refunded_total"] == "50.00"
    problem(post_money(client, jane, f"/cards/{card}/payments/{captured['payment_id']}"
                       "/refunds", {"amount": "45.51"}), 422, "refund-exceeds-payment")
    assert get_account(client, jane, account)["balance"] == "454.50"
    # A capture happens once: capturing or voiding again is a conflict.
    problem(capture(client, jane, hold["id"], "1.00"), 409, "authorization-resolved")
    problem(void(client, jane, hold["id"]), 409, "authorization-resolved")
    assert ledger.verify() == []


def test_a_full_capture_without_an_amount_and_a_void(client, jane):
    account, card = funded_card(client, jane, "500.00")
    first = ok(authorize(client, jane, card, "100.00"), 201)
    second = ok(authorize(client, jane, card, "50.00"), 201)
    assert ok(capture(client, jane, first["id"]), 200)["captured_amount"] == "100.00"
    voided = ok(void(client, jane, second["id"]), 200)
    assert (voided["status"], voided["released_amount"]) == ("voided", "50.00")
    assert voided["resolved_at"] is not None
    assert amounts(client, jane, account) == ("400.00", "400.00", "0.00", "400.00")
    problem(capture(client, jane, second["id"]), 409, "authorization-resolved")
    problem(void(client, jane, second["id"]), 409, "authorization-resolved")
    assert ledger.verify() == []


def test_a_capture_above_the_hold_is_refused_and_changes_nothing(client, jane):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "120.00"), 201)
    body = problem(capture(client, jane, hold["id"], "120.01"), 422,
                   "capture-exceeds-authorization")
    assert "120.00 USD held" in body["detail"]
    assert ok(client.simulate_get(f"{API}/authorizations/{hold['id']}",
                                  headers=jane.headers), 200)["status"] == "active"
    assert amounts(client, jane, account) == ("500.00", "380.00", "120.00", "380.00")


def test_six_holds_of_1000_do_not_fit_in_5000_and_holds_reserve_for_every_debit(client, jane):
    account, card = funded_card(client, jane, "5000.00")
    ok(client.simulate_patch(f"{API}/cards/{card}/limits", headers=jane.headers,
                             json={"daily_limit": "10000.00", "monthly_limit": "10000.00"}), 200)
    for _ in range(5):
        ok(authorize(client, jane, card, "1000.00"), 201)
    problem(authorize(client, jane, card, "1000.00"), 422, "insufficient-funds")
    assert amounts(client, jane, account) == ("5000.00", "0.00", "5000.00", "0.00")
    # Every debit counts the holds: withdrawal, transfer, card payment.
    other = open_account(client, jane, name="Savings")["id"]
    problem(post_money(client, jane, f"/accounts/{account}/withdrawals", {"amount": "0.01"}),
            422, "insufficient-funds")
    problem(post_money(client, jane, "/transfers", {"from_account_id": account,
                                                   "to_account_id": other, "amount": "0.01"}),
            422, "insufficient-funds")
    problem(post_money(client, jane, f"/cards/{card}/payments", {
        "merchant_name": "Shop", "merchant_category": "5411", "amount": "0.01",
        "currency": "USD", "channel": "chip"}), 422, "insufficient-funds")
    assert get_account(client, jane, account)["balance"] == "5000.00"


def test_holds_count_against_the_card_limits_while_active(client, jane):
    account, card = funded_card(client, jane, "5000.00")
    ok(client.simulate_patch(f"{API}/cards/{card}/limits", headers=jane.headers,
                             json={"daily_limit": "1000.00", "monthly_limit": "1500.00"}), 200)
    hold = ok(authorize(client, jane, card, "800.00"), 201)
    payment = {"merchant_name": "Shop", "merchant_category": "5411", "amount": "300.00",
               "currency": "USD", "channel": "chip"}
    problem(post_money(client, jane, f"/cards/{card}/payments", payment), 422,
            "daily-limit-exceeded")
    problem(authorize(client, jane, card, "300.00"), 422, "daily-limit-exceeded")
    ok(void(client, jane, hold["id"]), 200)
    ok(post_money(client, jane, f"/cards/{card}/payments", payment), 201)
    # Captured, a hold counts once: as the payment it became.
    big = ok(authorize(client, jane, card, "700.00"), 201)
    problem(authorize(client, jane, card, "0.01"), 422, "daily-limit-exceeded")
    ok(capture(client, jane, big["id"], "600.00"), 200)
    ok(authorize(client, jane, card, "100.00"), 201)
    problem(authorize(client, jane, card, "0.01"), 422, "daily-limit-exceeded")


def test_holds_count_against_the_monthly_limit(client, jane, clock):
    account, card = funded_card(client, jane, "5000.00")
    ok(client.simulate_patch(f"{API}/cards/{card}/limits", headers=jane.headers,
                             json={"daily_limit": "1000.00", "monthly_limit": "1200.00"}), 200)
    first_day = clock.now.replace(day=1, hour=12, minute=0, second=0, microsecond=0)
    clock.now = first_day
    ok(authorize(client, jane, card, "900.00"), 201)
    # The next day: a new daily allowance, the same month's.
    clock.now = first_day + timedelta(days=1)
    problem(authorize(client, jane, card, "400.00"), 422, "monthly-limit-exceeded")
    ok(authorize(client, jane, card, "300.00"), 201)


def test_an_authorization_is_refused_like_a_payment(client, jane):
    account, card = funded_card(client, jane, "500.00")
    problem(authorize(client, jane, card, "1.00", channel="online", international=True), 422,
            "channel-disabled")
    problem(authorize(client, jane, card, "1.00", currency="EUR"), 422, "currency-mismatch")
    ok(client.simulate_post(f"{API}/cards/{card}/freeze", headers=jane.headers), 200)
    problem(authorize(client, jane, card, "1.00"), 422, "card-not-active")
    assert CardHold.select().count() == 0


def test_another_users_card_and_hold_are_not_found(client, jane, make_user):
    mallory = make_user()
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "10.00"), 201)
    problem(authorize(client, mallory, card, "1.00"), 404, "not-found")
    problem(capture(client, mallory, hold["id"]), 404, "not-found")
    problem(void(client, mallory, hold["id"]), 404, "not-found")
    problem(client.simulate_get(f"{API}/authorizations/{hold['id']}",
                                headers=mallory.headers), 404, "not-found")
    problem(capture(client, jane, str(uuid.uuid4())), 404, "not-found")
    assert ok(client.simulate_get(f"{API}/authorizations/{hold['id']}",
                                  headers=jane.headers), 200)["status"] == "active"


def test_an_idempotency_key_replays_the_authorization_and_the_capture(client, jane):
    account, card = funded_card(client, jane, "500.00")
    first = authorize(client, jane, card, "10.00", key="auth-1")
    again = authorize(client, jane, card, "10.00", key="auth-1")
    assert (first.status_code, again.status_code, again.text) == (201, 201, first.text)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert CardHold.select().count() == 1
    hold_id = first.json["id"]
    one = capture(client, jane, hold_id, "4.00", key="cap-1")
    two = capture(client, jane, hold_id, "4.00", key="cap-1")
    assert (one.status_code, two.status_code, two.text) == (200, 200, one.text)
    assert get_account(client, jane, account)["balance"] == "496.00"
    problem(capture(client, jane, hold_id, "4.00", key="cap-2"), 409, "authorization-resolved")


def test_a_closed_account_cannot_keep_pending_holds(client, jane):
    account, card = funded_card(client, jane, None)
    Account.update(overdraft_limit=10_000).where(Account.id == account).execute()
    hold = ok(authorize(client, jane, card, "10.00"), 201)
    problem(client.simulate_post(f"{API}/accounts/{account}/close", headers=jane.headers), 422,
            "account-not-empty")
    ok(void(client, jane, hold["id"]), 200)
    ok(client.simulate_post(f"{API}/accounts/{account}/close", headers=jane.headers), 200)


# --------------------------------------------------------------------------
# Expiry, on a pinned clock


def test_an_expired_hold_stops_counting_at_once_and_the_sweep_records_it(client, jane, clock):
    account, card = funded_card(client, jane, "500.00")
    start = clock.now
    hold = ok(authorize(client, jane, card, "200.00"), 201)
    assert hold["expires_at"] == (start + timedelta(days=7)).isoformat().replace("+00:00", "Z")
    clock.now = start + timedelta(days=7) - timedelta(microseconds=1)
    assert amounts(client, jane, account)[1:3] == ("300.00", "200.00")
    clock.now = start + timedelta(days=7)
    # Expired at its expires_at: no sweep has run, yet it no longer counts.
    assert CardHold.get_by_id(hold["id"]).status == "active"
    assert amounts(client, jane, account) == ("500.00", "500.00", "0.00", "500.00")
    seen = ok(client.simulate_get(f"{API}/authorizations/{hold['id']}",
                                  headers=jane.headers), 200)
    assert seen["status"] == "expired"
    problem(capture(client, jane, hold["id"]), 409, "authorization-expired")
    problem(void(client, jane, hold["id"]), 409, "authorization-expired")
    assert ledger.verify() == []
    assert holds.expire(clock.now) == 1
    stored = CardHold.get_by_id(hold["id"])
    assert (stored.status, stored.resolved_at) == ("expired", stored.expires_at)
    assert holds.expire(clock.now) == 0
    problem(capture(client, jane, hold["id"]), 409, "authorization-resolved")
    assert ledger.verify() == []


def test_a_hold_past_its_expiry_reserves_nothing_for_any_debit(client, jane, clock):
    """Authorized eight days ago (7-day expiry): expired on the database's clock too."""
    account, card = funded_card(client, jane, "500.00")
    clock.now = datetime.now(timezone.utc) - timedelta(days=8)
    ok(authorize(client, jane, card, "500.00"), 201)
    clock.now = datetime.now(timezone.utc)
    # Not swept: the withdrawal's own funds check ignores it all the same.
    ok(post_money(client, jane, f"/accounts/{account}/withdrawals", {"amount": "500.00"}), 201)
    assert ledger.verify() == []


def test_expiry_is_chosen_at_authorization(client, jane, clock):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "10.00", expires_in_days=1), 201)
    assert hold["expires_at"] == (clock.now + timedelta(days=1)).isoformat().replace(
        "+00:00", "Z")
    longest = ok(authorize(client, jane, card, "10.00", expires_in_days=30), 201)
    clock.now += timedelta(days=2)
    assert amounts(client, jane, account)[2] == "10.00"
    ok(capture(client, jane, longest["id"]), 200)


# --------------------------------------------------------------------------
# Bad input: a problem, and nothing changed


@pytest.mark.parametrize("body, field", [
    ({"amount": "0"}, "amount"),
    ({"amount": "-1.00"}, "amount"),
    ({"amount": "1.001"}, "amount"),
    ({"amount": 1.5}, "amount"),
    ({"amount": "1e3"}, "amount"),
    ({"currency": "XXX"}, "currency"),
    ({"channel": "telepathy"}, "channel"),
    ({"merchant_name": ""}, "merchant_name"),
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"expires_in_days": 31}, "expires_in_days"),
    ({"expires_in_days": "7"}, "expires_in_days"),
    ({"surprise": True}, "surprise"),
])
def test_bad_authorizations_are_refused_and_hold_nothing(client, jane, body, field):
    account, card = funded_card(client, jane, "500.00")
    result = authorize(client, jane, card, **{"amount": "1.00", **body})
    assert result.status_code == 422, result.text
    assert result.headers["content-type"] == "application/problem+json"
    assert any(field in e["field"] for e in result.json.get("errors") or []), result.json
    assert CardHold.select().count() == 0


@pytest.mark.parametrize("body", [{"amount": "0"}, {"amount": "abc"}, {"amount": 5},
                                  {"amount": "1.001"}, {"extra": 1}])
def test_bad_captures_are_refused_and_leave_the_hold_active(client, jane, body):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "10.00"), 201)
    result = post_money(client, jane, f"/authorizations/{hold['id']}/capture", body)
    assert result.status_code == 422, result.text
    assert result.headers["content-type"] == "application/problem+json"
    assert CardHold.get_by_id(hold["id"]).status == "active"
    assert get_account(client, jane, account)["balance"] == "500.00"


# --------------------------------------------------------------------------
# Races, on a real server


def _post(conn, path, token, body=None, key=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    conn.request("POST", path, body=json.dumps(body or {}), headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def test_fifty_concurrent_captures_and_voids_have_exactly_one_winner(app, settings, client,
                                                                     jane):
    account, card = funded_card(client, jane, "500.00")
    hold = ok(authorize(client, jane, card, "100.00"), 201)
    start = threading.Barrier(50)
    answers = [None] * 50
    with LiveServer(app, settings, threads=16) as server:
        def racer(i):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            path = f"{API}/authorizations/{hold['id']}/" + ("capture" if i % 2 else "void")
            body = {"amount": "60.00"} if i % 2 else None
            key = f"racer-{i}"
            start.wait()
            first = _post(conn, path, jane.token, body, key)
            # A retry with its own key replays its own first answer.
            answers[i] = (first, _post(conn, path, jane.token, body, key))
            conn.close()

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert all(a is not None for a in answers)
    winners = [i for i, ((status, _), _) in enumerate(answers) if status == 200]
    assert len(winners) == 1
    for (first, replay) in answers:
        assert replay == first
        if first[0] != 200:
            assert first[0] == 409 and first[1]["type"].endswith("/authorization-resolved")
    won = answers[winners[0]][0][1]
    stored = CardHold.get_by_id(hold["id"])
    assert stored.status == won["status"]
    balance = get_account(client, jane, account)["balance"]
    assert balance == ("440.00" if won["status"] == "captured" else "500.00")
    assert Transaction.select().where((Transaction.card == card)
                                      & (Transaction.type == "payment")).count() == (
        1 if won["status"] == "captured" else 0)
    assert ledger.verify() == []


def test_eight_threads_of_200_authorizations_never_hold_more_than_there_is(app, settings,
                                                                          client, jane):
    """100.00 + 20.00 overdraft, 1.00 each: exactly 120 of 1,600 holds fit."""
    account, card = funded_card(client, jane, "100.00", overdraft=2_000)
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            row = db.execute_sql(
                "SELECT a.balance + a.overdraft_limit, COALESCE(SUM(h.amount), 0) "
                "FROM accounts a LEFT JOIN card_holds h ON h.account_id = a.id "
                "AND h.status = 'active' WHERE a.id = %s GROUP BY a.id",
                (uuid.UUID(account).hex,)).fetchone()
            peak.append((int(row[0]), int(row[1])))
        db.close()

    statuses = []
    lock = threading.Lock()
    with LiveServer(app, settings, threads=8) as server:
        def client_thread(n):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            mine = []
            for i in range(200):
                status, body = _post(conn, f"{API}/cards/{card}/authorizations", jane.token, {
                    "merchant_name": "Pump 4", "merchant_category": "5542", "amount": "1.00",
                    "currency": "USD", "channel": "contactless"}, key=f"t{n}-{i}")
                mine.append((status, body["type"] if status != 201 else None))
            conn.close()
            with lock:
                statuses.extend(mine)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        stop.set()
        watcher.join(30)
    assert len(statuses) == 1600
    assert sum(1 for s, _ in statuses if s == 201) == 120
    assert {t for s, t in statuses if s != 201} == {
        "https://hoardrun.dev/problems/insufficient-funds"}
    assert peak and all(held <= room for room, held in peak)
    assert amounts(client, jane, account) == ("100.00", "-20.00", "120.00", "0.00")
    assert ledger.verify() == []
