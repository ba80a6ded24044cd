"""History over HTTP on both backends: pages, cursors, filters, query counts, statements,
and a user who never sees anyone else's money through any route.
"""

import base64
import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from money_helpers import (
    API, deposit, get_account, ok, open_account, pay, post_money, problem, random_id,
    transfer, walk, withdraw,
)

from hoardrun import cards, ledger
from hoardrun.money import parse_amount


@pytest.fixture
def john(make_user):
    return make_user(first_name="John", last_name="Smith")


def entries_url(account_id):
    return f"{API}/accounts/{account_id}/transactions"


def order_key(entry):
    return (entry["created_at"], entry["id"])


@pytest.fixture
def busy(client, settings, jane, john):
    """Jane's account with 25+ entries of every kind; John's account she pays and is paid from."""
    main = open_account(client, jane)
    savings = open_account(client, jane, name="Savings")
    johns = open_account(client, john)
    deposit(client, jane, main["id"], "500.00", "Salary")
    deposit(client, john, johns["id"], "100.00")
    card = cards.issue_card(jane.id, main["id"], "debit", "Jane Doe", settings=settings).card
    for i in range(6):
        transfer(client, jane, main["id"], savings["id"], f"{i + 1}.00", f"Save {i}")
        pay(client, jane, john, "2.50", f"Lunch {i}")
        pay(client, john, jane, "1.25", f"Back {i}")
        cards.pay(jane.id, card.id, amount="3.10", currency="USD", merchant_name="Cafe Rio",
                  merchant_category="5812", channel="chip")
    withdraw(client, jane, main["id"], "10.00")
    return {"main": main, "savings": savings, "johns": johns, "card": card}


# ---------------------------------------------------------------------------
# Pages and cursors


def test_pages_walk_every_entry_once_newest_first(client, jane, busy):
    everything, _ = walk(client, jane, entries_url(busy["main"]["id"]), {"limit": 100})
    assert len(everything) == 26
    paged, pages = walk(client, jane, entries_url(busy["main"]["id"]), {"limit": 7})
    assert pages == 4  # 7 + 7 + 7 + 5
    assert [e["id"] for e in paged] == [e["id"] for e in everything]
    assert len({e["id"] for e in paged}) == 26
    assert paged == sorted(paged, key=order_key, reverse=True)
    assert paged[0]["type"] == "withdrawal"  # the last thing that happened
    # The newest entry's balance is the account's balance.
    assert paged[0]["balance_after"] == get_account(client, jane, busy["main"]["id"])["balance"]


def test_the_default_page_is_20_and_limit_is_1_to_100(client, jane, busy):
    url = entries_url(busy["main"]["id"])
    body = ok(client.simulate_get(url, headers=jane.headers), 200)
    assert len(body["items"]) == 20 and body["next_cursor"]
    for limit in (0, 101, -1, "x"):
        result = client.simulate_get(url, headers=jane.headers, params={"limit": limit})
        problem(result, 422, "validation-error")


def test_new_entries_do_not_shift_a_page_in_progress(client, jane, busy):
    url = entries_url(busy["main"]["id"])
    first = ok(client.simulate_get(url, headers=jane.headers, params={"limit": 5}), 200)
    deposit(client, jane, busy["main"]["id"], "1.00")  # lands before page 1, not in page 2
    second = ok(client.simulate_get(url, headers=jane.headers,
                                    params={"limit": 5, "cursor": first["next_cursor"]}), 200)
    assert min(order_key(e) for e in first["items"]) > max(order_key(e) for e in second["items"])
    assert not {e["id"] for e in first["items"]} & {e["id"] for e in second["items"]}


def _tamper(cursor):
    body, _, signature = cursor.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload[3] = "ffffffff-ffff-4fff-bfff-ffffffffffff"  # jump to another row
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"{forged}.{signature}"


def test_a_tampered_or_foreign_cursor_is_refused(client, jane, busy):
    main, savings = busy["main"]["id"], busy["savings"]["id"]
    cursor = ok(client.simulate_get(entries_url(main), headers=jane.headers,
                                    params={"limit": 2}), 200)["next_cursor"]
    bad = [
        (entries_url(main), {"cursor": _tamper(cursor)}),
        (entries_url(main), {"cursor": cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")}),
        (entries_url(main), {"cursor": "not-a-cursor"}),
        (entries_url(main), {"cursor": cursor, "type": "deposit"}),   # other filters
        (entries_url(savings), {"cursor": cursor}),                     # other account
        (f"{API}/transfers", {"cursor": cursor}),                       # other list
        (f"{API}/p2p", {"cursor": cursor}),
    ]
    for url, params in bad:
        result = client.simulate_get(url, headers=jane.headers, params={"limit": 2, **params})
        assert problem(result, 422, "invalid-cursor")["errors"][0]["field"] == "cursor"
    # The genuine cursor still works.
    ok(client.simulate_get(entries_url(main), headers=jane.headers,
                           params={"limit": 2, "cursor": cursor}), 200)


def test_entries_name_the_other_side_without_revealing_other_users_accounts(client, jane,
                                                                            john, busy):
    items, _ = walk(client, jane, entries_url(busy["main"]["id"]), {"limit": 100})
    kinds = {e["type"]: e["counterparty"] for e in items}
    assert kinds["transfer_out"] == {"kind": "account", "account_id": busy["savings"]["id"],
                                     "user_id": None, "name": "Savings"}
    assert kinds["p2p_out"] == {"kind": "user", "account_id": None, "user_id": str(john.id),
                                "name": "John S."}
    assert kinds["deposit"]["kind"] == "external"
    assert busy["johns"]["id"] not in json.dumps(items)


# ---------------------------------------------------------------------------
# Query counts


def count_queries(monkeypatch, database, request):
    """How many SQL statements ``request()`` ran (ORM and raw alike)."""
    calls = []
    real = database.execute_sql

    def counting(sql, params=None, *args, **kwargs):
        calls.append(sql)
        return real(sql, params, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(database, "execute_sql", counting)
        result = request()
    return len(calls), result


@pytest.mark.parametrize("path", ["entries", "/transfers", "/p2p"])
def test_a_page_of_20_costs_the_same_queries_as_a_page_of_2(client, database, jane, john,
                                                            busy, monkeypatch, path):
    for i in range(14):  # enough transfers and payments for a full page of each
        transfer(client, jane, busy["main"]["id"], busy["savings"]["id"], "0.01")
    for i in range(8):
        pay(client, jane, john, "0.01")
    url = entries_url(busy["main"]["id"]) if path == "entries" else f"{API}{path}"
    counts = {}
    for limit in (2, 20):
        counts[limit], result = count_queries(
            monkeypatch, database,
            lambda: client.simulate_get(url, headers=jane.headers, params={"limit": limit}))
        assert len(ok(result, 200)["items"]) == limit
    assert counts[2] == counts[20]
    assert counts[20] <= 3  # the token, (the account,) the page


# ---------------------------------------------------------------------------
# Filters


@pytest.fixture
def varied(client, settings, jane, john):
    acc = open_account(client, jane)
    other = open_account(client, jane, name="Other")
    open_account(client, john)
    made = [
        deposit(client, jane, acc["id"], "10.00", "Coffee beans 100% arabica"),
        deposit(client, jane, acc["id"], "50.00", "Salary_May"),
        withdraw(client, jane, acc["id"], "5.00"),
    ]
    transfer(client, jane, acc["id"], other["id"], "20.00", "to savings")
    pay(client, jane, john, "3.00", "Lunch")
    card = cards.issue_card(jane.id, acc["id"], "debit", "Jane Doe", settings=settings).card
    cards.pay(jane.id, card.id, amount="7.50", currency="USD", merchant_name="Cafe",
              merchant_category="5812", channel="online")
    return acc, made


@pytest.mark.parametrize("params, expected", [
    ({"type": "deposit"}, {"10.00", "50.00"}),
    ({"direction": "outbound"}, {"5.00", "20.00", "3.00", "7.50"}),
    ({"direction": "inbound", "type": "withdrawal"}, set()),
    ({"status": "completed"}, {"10.00", "50.00", "5.00", "20.00", "3.00", "7.50"}),
    ({"status": "pending"}, set()),
    ({"min_amount": "7.50", "max_amount": "20.00"}, {"10.00", "20.00", "7.50"}),
    ({"min_amount": "20"}, {"50.00", "20.00"}),
    ({"max_amount": "3.00"}, {"3.00"}),
    ({"merchant_category": "5812"}, {"7.50"}),
    ({"q": "SALARY"}, {"50.00"}),
    ({"q": "100%"}, {"10.00"}),        # '%' is a literal percent sign
    ({"q": "_"}, {"50.00"}),           # '_' is a literal underscore
    ({"q": "lunch"}, {"3.00"}),
    ({"q": "nothing like it"}, set()),
])
def test_filters_pick_exactly_the_matching_entries(client, jane, varied, params, expected):
    acc, _ = varied
    items, _ = walk(client, jane, entries_url(acc["id"]), {"limit": 2, **params})
    assert sorted(e["amount"] for e in items) == sorted(expected)


def test_the_date_range_is_from_inclusive_to_exclusive(client, jane, varied):
    acc, made = varied
    salary = made[1]["created_at"]
    after = walk(client, jane, entries_url(acc["id"]), {"from": salary})[0]
    assert made[1]["id"] in {e["id"] for e in after}
    assert made[0]["id"] not in {e["id"] for e in after}
    assert len(after) == 5
    before = walk(client, jane, entries_url(acc["id"]), {"to": salary})[0]
    assert [e["id"] for e in before] == [made[0]["id"]]
    # Offsets are honoured: the same instant written in another zone.
    instant = datetime.fromisoformat(salary.replace("Z", "+00:00"))
    shifted = instant.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    assert walk(client, jane, entries_url(acc["id"]), {"from": shifted})[0] == after


@pytest.mark.parametrize("params, code, field", [
    ({"type": "bogus"}, "validation-error", "type"),
    ({"direction": "sideways"}, "validation-error", "direction"),
    ({"min_amount": "1.234"}, "invalid-amount", "min_amount"),
    ({"max_amount": "1e3"}, "invalid-amount", "max_amount"),
    ({"min_amount": "5.00", "max_amount": "4.99"}, "validation-error", "min_amount"),
    ({"from": "yesterday"}, "validation-error", "from"),
    ({"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}, "validation-error",
     "from"),
    ({"q": "x" * 101}, "validation-error", "q"),
    ({"colour": "red"}, "validation-error", "colour"),
])
def test_bad_filters_are_422_naming_the_field(client, jane, varied, params, code, field):
    acc, _ = varied
    result = client.simulate_get(entries_url(acc["id"]), headers=jane.headers, params=params)
    assert field in {e["field"] for e in problem(result, 422, code)["errors"]}


# ---------------------------------------------------------------------------
# Single entries and the other lists


def test_one_transaction_by_id(client, jane, varied):
    acc, made = varied
    shown = ok(client.simulate_get(f"{API}/transactions/{made[1]['id']}", headers=jane.headers),
               200)
    assert shown == made[1]


def test_transfers_and_payments_page_the_same_way(client, jane, john, busy):
    transfers, pages = walk(client, jane, f"{API}/transfers", {"limit": 4})
    assert len(transfers) == 6 and pages == 2
    assert transfers == sorted(transfers, key=order_key, reverse=True)
    only_savings = walk(client, jane, f"{API}/transfers",
                        {"account_id": busy["savings"]["id"]})[0]
    assert len(only_savings) == 6
    assert walk(client, jane, f"{API}/transfers", {"account_id": random_id()})[0] == []
    payments, pages = walk(client, jane, f"{API}/p2p", {"limit": 5})
    assert len(payments) == 12 and pages == 3
    assert Counter(p["direction"] for p in payments) == {"sent": 6, "received": 6}
    sent = walk(client, jane, f"{API}/p2p", {"direction": "sent"})[0]
    assert {p["counterparty"]["name"] for p in sent} == {"John S."}
    assert {p["account_id"] for p in payments} == {busy["main"]["id"]}


# ---------------------------------------------------------------------------
# Statements


def minor(amount):
    return parse_amount(amount, "USD", allow_zero=True, allow_negative=True)


def test_statement_equals_the_listed_entries_and_chains_from_the_balance_before(client, jane,
                                                                               busy):
    url = entries_url(busy["main"]["id"])
    everything, _ = walk(client, jane, url, {"limit": 100})
    # Start the period at the 10th oldest entry; end it in the future.
    oldest_first = list(reversed(everything))
    start = oldest_first[9]["created_at"]
    end = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    params = {"from": start, "to": end}
    st = ok(client.simulate_get(f"{API}/accounts/{busy['main']['id']}/statement",
                                headers=jane.headers, params=params), 200)
    listed, _ = walk(client, jane, url, {"limit": 7, **params})
    assert len(listed) == st["entry_count"] == 26 - 9
    total_in = sum(minor(e["amount"]) for e in listed if e["direction"] == "inbound")
    total_out = sum(minor(e["amount"]) for e in listed if e["direction"] == "outbound")
    assert (minor(st["total_in"]), minor(st["total_out"])) == (total_in, total_out)
    by_type = Counter()
    for e in listed:
        by_type[(e["type"], e["direction"])] += minor(e["amount"])
    assert {(t["type"], t["direction"]): minor(t["amount"]) for t in st["totals_by_type"]} == \
        dict(by_type)
    assert sum(t["count"] for t in st["totals_by_type"]) == st["entry_count"]
    # Opening is the balance the last entry before the period left behind ...
    assert st["opening_balance"] == oldest_first[8]["balance_after"]
    # ... and closing = opening + in - out = today's balance (the period runs to now).
    assert minor(st["closing_balance"]) == minor(st["opening_balance"]) + total_in - total_out
    assert st["closing_balance"] == get_account(client, jane, busy["main"]["id"])["balance"]
    assert (st["currency"], st["account_id"]) == ("USD", busy["main"]["id"])


def test_a_statement_of_an_empty_period(client, jane, busy):
    future = datetime.now(timezone.utc) + timedelta(days=1)
    st = ok(client.simulate_get(
        f"{API}/accounts/{busy['main']['id']}/statement", headers=jane.headers,
        params={"from": future.isoformat(), "to": (future + timedelta(days=1)).isoformat()}),
        200)
    balance = get_account(client, jane, busy["main"]["id"])["balance"]
    assert (st["opening_balance"], st["closing_balance"], st["total_in"], st["total_out"],
            st["entry_count"], st["totals_by_type"]) == (balance, balance, "0.00", "0.00", 0, [])
    past = ok(client.simulate_get(
        f"{API}/accounts/{busy['main']['id']}/statement", headers=jane.headers,
        params={"from": "2000-01-01T00:00:00Z", "to": "2000-02-01T00:00:00Z"}), 200)
    assert (past["opening_balance"], past["closing_balance"]) == ("0.00", "0.00")


def test_a_statement_defaults_to_this_month_so_far(client, jane, busy):
    st = ok(client.simulate_get(f"{API}/accounts/{busy['main']['id']}/statement",
                                headers=jane.headers), 200)
    start = datetime.fromisoformat(st["from"].replace("Z", "+00:00"))
    assert (start.day, start.hour, start.minute, start.second) == (1, 0, 0, 0)
    assert st["entry_count"] == 26
    assert st["closing_balance"] == get_account(client, jane, busy["main"]["id"])["balance"]


def test_a_statement_needs_from_before_to(client, jane, busy):
    result = client.simulate_get(f"{API}/accounts/{busy['main']['id']}/statement",
                                 headers=jane.headers,
                                 params={"from": "2030-01-01T00:00:00Z",
                                         "to": "2030-01-01T00:00:00Z"})
    problem(result, 422, "validation-error")


# ---------------------------------------------------------------------------
# Nobody sees anyone else's money


def test_another_user_sees_nothing_of_mine_through_any_route(client, jane, busy, make_user):
    eve = make_user()
    eves = open_account(client, eve)
    deposit(client, eve, eves["id"], "1.00")
    main = busy["main"]["id"]
    jane_entry = walk(client, jane, entries_url(main), {"limit": 100})[0][0]
    jane_transfer = walk(client, jane, f"{API}/transfers")[0][0]
    jane_payment = walk(client, jane, f"{API}/p2p")[0][0]
    probes = [
        ("GET", f"{API}/accounts/{{}}", main),
        ("GET", f"{API}/accounts/{{}}/transactions", main),
        ("GET", f"{API}/accounts/{{}}/statement", main),
        ("GET", f"{API}/transactions/{{}}", jane_entry["id"]),
        ("GET", f"{API}/transfers/{{}}", jane_transfer["id"]),
        ("GET", f"{API}/p2p/{{}}", jane_payment["id"]),
        ("POST", f"{API}/accounts/{{}}/deposits", main),
        ("POST", f"{API}/accounts/{{}}/withdrawals", main),
    ]
    before = get_account(client, jane, main)
    for method, template, theirs in probes:
        body = {"amount": "1.00"} if method == "POST" else None
        seen = client.simulate_request(method, template.format(theirs), headers=eve.headers,
                                       json=body)
        missing = client.simulate_request(method, template.format(random_id()),
                                          headers=eve.headers, json=body)
        a, b = problem(seen, 404, "not-found"), problem(missing, 404, "not-found")
        # Identical but for where and when it was asked.
        drop = ("instance", "request_id")
        assert {k: v for k, v in a.items() if k not in drop} == \
            {k: v for k, v in b.items() if k not in drop}, template
    # Moving money out of her accounts with my own account ids.
    for body in ({"from_account_id": main, "to_account_id": eves["id"], "amount": "1.00"},
                 {"from_account_id": eves["id"], "to_account_id": main, "amount": "1.00"}):
        problem(post_money(client, eve, "/transfers", body), 404, "not-found")
    # Her account as my source is looked at before anything else: missing, not "yourself".
    problem(post_money(client, eve, "/p2p", {"recipient_email": eve.email, "amount": "1.00",
                                             "from_account_id": main}), 404, "not-found")
    problem(post_money(client, eve, "/p2p", {"recipient_user_id": str(jane.id),
                                             "amount": "1.00", "from_account_id": main}), 404,
            "not-found")
    # Her lists hold nothing of mine.
    assert [a["id"] for a in ok(client.simulate_get(f"{API}/accounts", headers=eve.headers),
                                200)["items"]] == [eves["id"]]
    assert walk(client, eve, f"{API}/transfers")[0] == []
    assert walk(client, eve, f"{API}/p2p")[0] == []
    assert get_account(client, jane, main) == before
    assert ledger.verify() == []
