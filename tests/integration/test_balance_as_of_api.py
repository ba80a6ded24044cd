"""Balance as of an instant through HTTP, at the edges of the entries that made it."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from falcon import testing

from hoardrun.api import create_app
from money_helpers import deposit, ok, open_account, post_money, problem, withdraw

API = "/api/v1"


class Clock:
    def __init__(self):
        self.now = None

    def __call__(self):
        return self.now or datetime.now(timezone.utc)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(settings, database, clock):
    return create_app(settings, clock=clock)


@pytest.fixture
def client(app):
    return testing.TestClient(app)


@pytest.fixture
def jane(make_user):
    return make_user()


def iso(moment):
    return moment.isoformat().replace("+00:00", "Z")


def at(client, person, account_id, moment):
    when = moment if isinstance(moment, str) else iso(moment)
    return client.simulate_get(f"{API}/accounts/{account_id}/balance", headers=person.headers,
                               params={"as_of": when})


def parse(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_balance_at_each_entry_boundary(client, jane):
    account = open_account(client, jane)["id"]
    first = deposit(client, jane, account, "100.00")
    second = withdraw(client, jane, account, "30.00")
    third = deposit(client, jane, account, "5.50")
    t1, t2, t3 = (parse(e["created_at"]) for e in (first, second, third))
    tick = timedelta(microseconds=1)

    def balance(moment):
        body = ok(at(client, jane, account, moment), 200)
        return body["balance"], body["entry_id"]

    assert balance(t1 - tick) == ("0.00", None)            # before the first entry
    assert balance(t1) == ("100.00", first["id"])          # exactly at an entry's time
    assert balance(t2 - tick) == ("100.00", first["id"])   # just before the next
    assert balance(t2) == ("70.00", second["id"])
    assert balance(t3) == ("75.50", third["id"])
    assert balance(datetime.now(timezone.utc)) == ("75.50", third["id"])
    # The same instant in another offset, and without one (read as UTC).
    offset = t2.astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert ok(at(client, jane, account, offset), 200)["balance"] == "70.00"
    naive = t2.replace(tzinfo=None).isoformat()
    assert ok(at(client, jane, account, naive), 200)["balance"] == "70.00"


def test_an_instant_in_the_future_is_refused(client, jane, clock):
    account = open_account(client, jane)["id"]
    deposit(client, jane, account, "10.00")
    clock.now = datetime.now(timezone.utc)
    body = problem(at(client, jane, account, clock.now + timedelta(seconds=1)), 422,
                   "validation-error")
    assert body["errors"][0]["field"] == "as_of"
    assert ok(at(client, jane, account, clock.now), 200)["balance"] == "10.00"


def test_holds_of_the_time_lower_the_available_balance_then(client, jane):
    account = open_account(client, jane)["id"]
    deposit(client, jane, account, "100.00")
    card = ok(client.simulate_post(f"{API}/cards", headers=jane.headers, json={
        "account_id": account, "type": "debit", "cardholder_name": "Jane Doe"}), 201)["id"]
    hold = ok(post_money(client, jane, f"/cards/{card}/authorizations", {
        "merchant_name": "Hotel", "merchant_category": "7011", "amount": "40.00",
        "currency": "USD", "channel": "chip"}), 201)
    held_at = parse(hold["created_at"])
    voided = ok(client.simulate_post(f"{API}/authorizations/{hold['id']}/void",
                                     headers=jane.headers), 200)
    before = ok(at(client, jane, account, held_at - timedelta(microseconds=1)), 200)
    during = ok(at(client, jane, account, held_at), 200)
    after = ok(at(client, jane, account, parse(voided["resolved_at"])), 200)
    assert (before["pending_holds"], before["available_balance"]) == ("0.00", "100.00")
    assert (during["pending_holds"], during["available_balance"]) == ("40.00", "60.00")
    assert (after["pending_holds"], after["available_balance"]) == ("0.00", "100.00")
    assert during["balance"] == "100.00"


@pytest.mark.parametrize("params", [{}, {"as_of": "yesterday"}, {"as_of": "2024-13-01T00:00Z"},
                                    {"as_of": ""}, {"as_of": "2024-01-01T00:00Z", "x": "1"}])
def test_bad_instants_are_refused(client, jane, params):
    account = open_account(client, jane)["id"]
    result = client.simulate_get(f"{API}/accounts/{account}/balance", headers=jane.headers,
                                 params=params)
    problem(result, 422, "validation-error")


def test_another_users_account_is_not_found(client, jane, make_user):
    account = open_account(client, jane)["id"]
    mallory = make_user()
    problem(at(client, mallory, account, datetime.now(timezone.utc)), 404, "not-found")
    problem(at(client, jane, str(uuid.uuid4()), datetime.now(timezone.utc)), 404, "not-found")
