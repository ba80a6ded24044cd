"""/api/v1/accounts on both backends: open, list, read, rename, primary, close."""

import threading
import uuid

import pytest
from money_helpers import (
    API, audit_rows, deposit, field_names, get_account, ok, open_account, problem, random_id,
    withdraw,
)

from hoardrun.models import Account
from hoardrun.security import is_luhn_valid


@pytest.fixture
def john(make_user):
    return make_user()


# ---------------------------------------------------------------------------
# Open


def test_open_account_returns_201_with_location_and_a_luhn_checked_number(client, jane):
    result = client.simulate_post(f"{API}/accounts", headers={**jane.headers,
                                                              "X-Request-ID": "open-1"},
                                  json={"type": "savings", "currency": "EUR", "name": " Rainy day "})
    body = ok(result, 201)
    assert result.headers["location"] == f"{API}/accounts/{body['id']}"
    assert len(body["account_number"]) == 11 and body["account_number"].isdigit()
    assert is_luhn_valid(body["account_number"])
    assert (body["name"], body["type"], body["currency"], body["status"]) == (
        "Rainy day", "savings", "EUR", "active")
    assert (body["balance"], body["available"], body["overdraft_limit"]) == ("0.00",) * 3
    assert body["is_primary"] is True  # a user's first account
    assert body["closed_at"] is None
    # The Location answers with the same account.
    assert ok(client.simulate_get(result.headers["location"], headers=jane.headers), 200) == body
    (row,) = audit_rows("account.open", body["id"])
    assert (str(row.actor_id), row.request_id) == (str(jane.id), "open-1")


def test_second_account_is_not_primary_and_amounts_use_the_currency_exponent(client, jane):
    open_account(client, jane)
    jpy = open_account(client, jane, currency="JPY")
    kwd = open_account(client, jane, currency="KWD")
    assert jpy["is_primary"] is False and kwd["is_primary"] is False
    assert (jpy["balance"], kwd["balance"]) == ("0", "0.000")


@pytest.mark.parametrize("body, status, code, field", [
    ({"type": "piggybank", "currency": "USD", "name": "x"}, 422, "validation-error", "type"),
    ({"type": "checking", "currency": "XYZ", "name": "x"}, 422, "unknown-currency", "currency"),
    ({"type": "checking", "currency": "usd", "name": "x"}, 422, "unknown-currency", "currency"),
    ({"type": "checking", "currency": "USD", "name": "   "}, 422, "validation-error", "name"),
    ({"type": "checking", "currency": "USD", "name": "x" * 101}, 422, "validation-error",
     "name"),
    ({"type": "checking", "currency": "USD"}, 422, "validation-error", "name"),
    ({"type": "checking", "currency": "USD", "name": "x", "balance": "100.00"}, 422,
     "validation-error", "balance"),
])
def test_open_account_refuses_bad_input_naming_the_field(client, jane, body, status, code,
                                                         field):
    result = client.simulate_post(f"{API}/accounts", headers=jane.headers, json=body)
    assert field in field_names(problem(result, status, code))
    assert Account.select().where(Account.user == jane.id).count() == 0


def test_accounts_need_a_token(client):
    for method, path in (("GET", "/accounts"), ("POST", "/accounts"),
                         ("GET", f"/accounts/{random_id()}")):
        problem(client.simulate_request(method, f"{API}{path}", json={}), 401, "unauthorized")


# ---------------------------------------------------------------------------
# List and read


def test_list_shows_only_my_accounts_oldest_first(client, jane, john):
    mine = [open_account(client, jane, name=f"J{i}") for i in range(3)]
    open_account(client, john, name="Not yours")
    body = ok(client.simulate_get(f"{API}/accounts", headers=jane.headers), 200)
    assert [a["id"] for a in body["items"]] == [a["id"] for a in mine]
    assert ok(client.simulate_get(f"{API}/accounts", headers=john.headers), 200)["items"][0][
        "name"] == "Not yours"


def test_get_shows_balance_and_available_including_the_overdraft(client, jane):
    acc = open_account(client, jane, currency="KWD")
    Account.update(overdraft_limit=50_000).where(Account.id == acc["id"]).execute()
    deposit(client, jane, acc["id"], "12.345")
    withdraw(client, jane, acc["id"], "20")
    body = get_account(client, jane, acc["id"])
    assert (body["balance"], body["overdraft_limit"], body["available"]) == (
        "-7.655", "50.000", "42.345")


def test_someone_elses_account_is_404_exactly_like_a_missing_one(client, jane, john):
    theirs = open_account(client, john)
    for account_id in (theirs["id"], random_id()):
        for method, suffix, body in (("GET", "", None), ("PATCH", "", {"name": "Mine now"}),
                                     ("POST", "/primary", None), ("POST", "/close", None)):
            result = client.simulate_request(method, f"{API}/accounts/{account_id}{suffix}",
                                             headers=jane.headers, json=body)
            got = problem(result, 404, "not-found")
            assert (got["title"], got["detail"]) == ("Not found", "account not found")
    assert get_account(client, john, theirs["id"]) == theirs  # untouched


def test_a_malformed_account_id_is_404(client, jane):
    problem(client.simulate_get(f"{API}/accounts/not-a-uuid", headers=jane.headers), 404,
            "not-found")


# ---------------------------------------------------------------------------
# Rename


def test_rename_changes_the_name_and_audits_before_and_after(client, jane):
    acc = open_account(client, jane, name="Old")
    result = client.simulate_patch(f"{API}/accounts/{acc['id']}", json={"name": "  New  "},
                                   headers={**jane.headers, "X-Request-ID": "rename-1"})
    assert ok(result, 200)["name"] == "New"
    assert get_account(client, jane, acc["id"])["name"] == "New"
    (row,) = audit_rows("account.rename", acc["id"])
    assert (row.before, row.after, row.request_id) == ('{"name": "Old"}', '{"name": "New"}',
                                                       "rename-1")


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "   "}, {"name": "x" * 101}, {},
                                  {"name": "ok", "currency": "EUR"}])
def test_rename_refuses_bad_names(client, jane, body):
    acc = open_account(client, jane, name="Keep")
    result = client.simulate_patch(f"{API}/accounts/{acc['id']}", json=body,
                                   headers=jane.headers)
    problem(result, 422, "validation-error")
    assert get_account(client, jane, acc["id"])["name"] == "Keep"


def test_a_closed_account_cannot_be_renamed(client, jane):
    acc = open_account(client, jane)
    ok(client.simulate_post(f"{API}/accounts/{acc['id']}/close", headers=jane.headers), 200)
    result = client.simulate_patch(f"{API}/accounts/{acc['id']}", json={"name": "New"},
                                   headers=jane.headers)
    problem(result, 422, "account-not-active")


# ---------------------------------------------------------------------------
# Primary


def primaries(person):
    return [str(a.id) for a in Account.select().where((Account.user == person.id)
                                                       & (Account.is_primary == True))]  # noqa: E712


def test_set_primary_switches_atomically_and_leaves_exactly_one(client, jane):
    first = open_account(client, jane)
    second = open_account(client, jane)
    result = client.simulate_post(f"{API}/accounts/{second['id']}/primary",
                                  headers=jane.headers)
    assert ok(result, 200)["is_primary"] is True
    assert get_account(client, jane, first["id"])["is_primary"] is False
    assert primaries(jane) == [second["id"]]
    (row,) = audit_rows("account.set_primary", second["id"])
    assert first["id"] in row.before and second["id"] in row.after
    # Asking again changes nothing and writes no second audit row.
    ok(client.simulate_post(f"{API}/accounts/{second['id']}/primary", headers=jane.headers), 200)
    assert primaries(jane) == [second["id"]]
    assert len(audit_rows("account.set_primary")) == 1


@pytest.mark.parametrize("status, code", [("closed", "account-not-active"),
                                          ("suspended", "account-not-active")])
def test_only_an_active_account_can_be_primary(client, jane, status, code):
    first = open_account(client, jane)
    other = open_account(client, jane)
    (Account.update(status=status, closed_at=Account.created_at if status == "closed" else None)
     .where(Account.id == other["id"]).execute())
    problem(client.simulate_post(f"{API}/accounts/{other['id']}/primary", headers=jane.headers),
            422, code)
    assert primaries(jane) == [first["id"]]


@pytest.mark.slow
def test_concurrent_primary_switches_end_with_exactly_one_primary(client, jane):
    accounts = [open_account(client, jane, name=f"A{i}") for i in range(5)]
    statuses = []
    barrier = threading.Barrier(len(accounts))

    def switch(account_id):
        barrier.wait()
        result = client.simulate_post(f"{API}/accounts/{account_id}/primary",
                                      headers=jane.headers)
        statuses.append(result.status_code)

    threads = [threading.Thread(target=switch, args=(a["id"],)) for a in accounts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * len(accounts)
    assert len(primaries(jane)) == 1


# ---------------------------------------------------------------------------
# Close


def test_close_refuses_a_non_zero_balance_with_its_own_problem_type(client, jane):
    acc = open_account(client, jane)
    deposit(client, jane, acc["id"], "0.01")
    body = problem(client.simulate_post(f"{API}/accounts/{acc['id']}/close",
                                        headers=jane.headers), 422, "account-not-empty")
    assert "zero balance" in body["detail"]
    assert get_account(client, jane, acc["id"])["status"] == "active"
    # An overdrawn account is not empty either.
    Account.update(overdraft_limit=100).where(Account.id == acc["id"]).execute()
    withdraw(client, jane, acc["id"], "0.02")
    problem(client.simulate_post(f"{API}/accounts/{acc['id']}/close", headers=jane.headers),
            422, "account-not-empty")


def test_close_at_zero_sets_closed_at_demotes_primary_and_blocks_money(client, jane):
    acc = open_account(client, jane)
    deposit(client, jane, acc["id"], "5.00")
    withdraw(client, jane, acc["id"], "5.00")
    body = ok(client.simulate_post(f"{API}/accounts/{acc['id']}/close",
                                   headers={**jane.headers, "X-Request-ID": "close-1"}), 200)
    assert body["status"] == "closed" and body["closed_at"] is not None
    assert body["is_primary"] is False
    assert len(audit_rows("account.close", acc["id"])) == 1
    assert audit_rows("account.close", acc["id"])[0].request_id == "close-1"
    # Closed is closed: again is refused, and so is money.
    problem(client.simulate_post(f"{API}/accounts/{acc['id']}/close", headers=jane.headers),
            422, "account-not-active")
    result = client.simulate_post(f"{API}/accounts/{acc['id']}/deposits", headers=jane.headers,
                                  json={"amount": "1.00"})
    problem(result, 422, "account-not-active")
    assert get_account(client, jane, acc["id"])["balance"] == "0.00"


def test_a_frozen_account_cannot_be_closed_by_its_owner(client, jane):
    acc = open_account(client, jane)
    Account.update(status="suspended").where(Account.id == acc["id"]).execute()
    problem(client.simulate_post(f"{API}/accounts/{acc['id']}/close", headers=jane.headers),
            422, "account-not-active")
    assert Account.get_by_id(uuid.UUID(acc["id"])).status == "suspended"
