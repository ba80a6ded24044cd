"""Deposits, withdrawals, transfers and P2P payments over HTTP, on both backends.

Every refusal is a 422 (or 404) problem with its own type and moves nothing.
"""

import json

import pytest
from money_helpers import (
    API, audit_rows, deposit, field_names, get_account, ok, open_account, pay, post_money,
    problem, random_id, transfer, withdraw,
)

from hoardrun import ledger, movements
from hoardrun.models import Account, P2PTransaction, Transaction, Transfer, User


@pytest.fixture
def john(make_user):
    return make_user(first_name="John", last_name="Smith")


def books():
    """Everything a movement writes, to prove a refusal wrote nothing."""
    return (Transaction.select().count(), Transfer.select().count(),
            P2PTransaction.select().count(),
            sorted((str(a.id), a.balance) for a in Account.select()))


def balance(client, person, account_id):
    return get_account(client, person, account_id)["balance"]


# ---------------------------------------------------------------------------
# Deposits and withdrawals


def test_deposit_returns_the_new_entry_with_a_location_that_shows_it(client, jane):
    acc = open_account(client, jane)
    result = post_money(client, jane, f"/accounts/{acc['id']}/deposits",
                        {"amount": "100.50", "description": "Salary"},
                        headers={"X-Request-ID": "dep-1"})
    entry = ok(result, 201)
    assert result.headers["location"] == f"{API}/transactions/{entry['id']}"
    assert (entry["account_id"], entry["type"], entry["direction"], entry["amount"],
            entry["balance_after"], entry["currency"], entry["description"],
            entry["status"]) == (acc["id"], "deposit", "inbound", "100.50", "100.50", "USD",
                                 "Salary", "completed")
    assert entry["counterparty"] == {"kind": "external", "account_id": None, "user_id": None,
                                     "name": None}
    assert ok(client.simulate_get(result.headers["location"], headers=jane.headers),
              200) == entry
    assert balance(client, jane, acc["id"]) == "100.50"
    (row,) = audit_rows("deposit.create", entry["id"])
    assert (str(row.actor_id), row.request_id) == (str(jane.id), "dep-1")
    assert json.loads(row.after)["amount"] == 10050
    assert ledger.verify() == []


@pytest.mark.parametrize("currency, amount", [("USD", "7.25"), ("JPY", "725"),
                                              ("KWD", "7.250")])
def test_cash_bodies_are_what_the_entry_shows_later(client, jane, currency, amount):
    """A deposit's and a withdrawal's 201 body is exactly its GET /transactions/{id}."""
    acc = open_account(client, jane, currency=currency)
    for path, body in (("deposits", {"amount": amount, "description": "In"}),
                       ("withdrawals", {"amount": amount})):
        result = post_money(client, jane, f"/accounts/{acc['id']}/{path}", body)
        entry = ok(result, 201)
        assert ok(client.simulate_get(result.headers["location"], headers=jane.headers),
                  200) == entry
    assert (entry["type"], entry["description"], entry["balance_after"]) == (
        "withdrawal", None, "0" if currency == "JPY" else "0." + "0" * (len(amount) - 2))


def test_withdrawal_may_use_the_overdraft_exactly_and_not_one_cent_more(client, jane):
    acc = open_account(client, jane)
    Account.update(overdraft_limit=1_000).where(Account.id == acc["id"]).execute()
    deposit(client, jane, acc["id"], "5.00")
    before = books()
    result = post_money(client, jane, f"/accounts/{acc['id']}/withdrawals", {"amount": "15.01"})
    problem(result, 422, "insufficient-funds")
    assert books() == before
    entry = withdraw(client, jane, acc["id"], "15.00")
    assert (entry["type"], entry["direction"], entry["balance_after"]) == (
        "withdrawal", "outbound", "-10.00")
    assert get_account(client, jane, acc["id"])["available"] == "0.00"
    assert len(audit_rows("withdrawal.create", entry["id"])) == 1


@pytest.mark.parametrize("amount, code", [
    (12.5, "validation-error"),        # a JSON number, not a decimal string
    (10, "validation-error"),
    ("1e3", "invalid-amount"),
    ("1E3", "invalid-amount"),
    ("NaN", "invalid-amount"),
    ("Infinity", "invalid-amount"),
    ("12.345", "invalid-amount"),      # USD has two places
    ("-5.00", "invalid-amount"),
    ("0", "invalid-amount"),
    ("0.00", "invalid-amount"),
    ("1,000.00", "invalid-amount"),
    ("", "validation-error"),
    ("10000000000000.01", "invalid-amount"),  # beyond the largest amount
    (None, "validation-error"),
])
def test_bad_amounts_are_422_naming_the_amount_field_and_move_nothing(client, jane, amount,
                                                                      code):
    acc = open_account(client, jane)
    before = books()
    result = post_money(client, jane, f"/accounts/{acc['id']}/deposits", {"amount": amount})
    assert "amount" in field_names(problem(result, 422, code))
    assert books() == before


def test_nan_as_a_json_literal_is_a_malformed_body(client, jane):
    acc = open_account(client, jane)
    result = client.simulate_post(f"{API}/accounts/{acc['id']}/deposits",
                                  headers={**jane.headers, "Content-Type": "application/json"},
                                  body='{"amount": NaN}')
    problem(result, 400, "malformed-request")


def test_amounts_follow_the_account_currency(client, jane):
    jpy = open_account(client, jane, currency="JPY")
    kwd = open_account(client, jane, currency="KWD")
    assert deposit(client, jane, jpy["id"], "1500")["balance_after"] == "1500"
    problem(post_money(client, jane, f"/accounts/{jpy['id']}/deposits", {"amount": "1.5"}),
            422, "invalid-amount")
    assert deposit(client, jane, kwd["id"], "1.234")["balance_after"] == "1.234"


def test_money_into_someone_elses_account_is_404_and_moves_nothing(client, jane, john):
    theirs = open_account(client, john)
    deposit(client, john, theirs["id"], "50.00")
    before = books()
    for account_id in (theirs["id"], random_id()):
        for kind in ("deposits", "withdrawals"):
            result = post_money(client, jane, f"/accounts/{account_id}/{kind}",
                                {"amount": "1.00"})
            assert problem(result, 404, "not-found")["detail"] == "account not found"
    assert books() == before


def test_a_frozen_account_takes_no_money_in_or_out(client, jane):
    acc = open_account(client, jane)
    deposit(client, jane, acc["id"], "10.00")
    Account.update(status="suspended").where(Account.id == acc["id"]).execute()
    before = books()
    for kind in ("deposits", "withdrawals"):
        problem(post_money(client, jane, f"/accounts/{acc['id']}/{kind}", {"amount": "1.00"}),
                422, "account-not-active")
    assert books() == before


def test_a_suspended_user_cannot_move_money(client, make_user):
    mallory = make_user()
    acc = open_account(client, mallory)
    User.update(status="suspended").where(User.id == mallory.id).execute()
    before = books()
    problem(post_money(client, mallory, f"/accounts/{acc['id']}/deposits", {"amount": "1.00"}),
            401, "unauthorized")
    assert books() == before


# ---------------------------------------------------------------------------
# Transfers


def test_transfer_moves_money_between_my_accounts(client, jane):
    a, b = open_account(client, jane), open_account(client, jane, name="Savings")
    deposit(client, jane, a["id"], "100.00")
    result = post_money(client, jane, "/transfers",
                        {"from_account_id": a["id"], "to_account_id": b["id"],
                         "amount": "40.25", "currency": "USD", "description": "Save"},
                        headers={"X-Request-ID": "trf-1"})
    body = ok(result, 201)
    assert result.headers["location"] == f"{API}/transfers/{body['id']}"
    assert (body["from_account_id"], body["to_account_id"], body["amount"], body["currency"],
            body["fee"], body["description"], body["status"]) == (
        a["id"], b["id"], "40.25", "USD", "0.00", "Save", "completed")
    assert body["reference"].startswith("TRF-")
    shown = ok(client.simulate_get(result.headers["location"], headers=jane.headers), 200)
    assert {k: v for k, v in shown.items() if not k.endswith("_at")} == {
        k: v for k, v in body.items() if not k.endswith("_at")}
    assert (balance(client, jane, a["id"]), balance(client, jane, b["id"])) == ("59.75",
                                                                                "40.25")
    entries = Transaction.select().where(Transaction.transfer == body["id"])
    assert sorted((str(e.account_id), e.direction, e.amount) for e in entries) == sorted(
        [(a["id"], "outbound", 4025), (b["id"], "inbound", 4025)])
    (row,) = audit_rows("transfer.create", body["id"])
    assert row.request_id == "trf-1"


def _transfer_body(a, b, amount="1.00", **extra):
    return {"from_account_id": a["id"], "to_account_id": b["id"], "amount": amount, **extra}


def test_each_transfer_refusal_has_its_own_type_and_moves_nothing(client, jane, john):
    usd = open_account(client, jane)
    usd2 = open_account(client, jane, name="Second")
    eur = open_account(client, jane, currency="EUR")
    closed = open_account(client, jane, name="Closed")
    theirs = open_account(client, john)
    deposit(client, jane, usd["id"], "10.00")
    ok(client.simulate_post(f"{API}/accounts/{closed['id']}/close", headers=jane.headers), 200)
    cases = [
        (_transfer_body(usd, usd2, "10.01"), 422, "insufficient-funds"),
        (_transfer_body(usd, eur), 422, "currency-mismatch"),
        (_transfer_body(usd, usd2, currency="EUR"), 422, "currency-mismatch"),
        (_transfer_body(usd, usd), 422, "same-account"),
        (_transfer_body(usd, closed), 422, "account-not-active"),
        (_transfer_body(usd, theirs), 404, "not-found"),
        (_transfer_body(theirs, usd), 404, "not-found"),
        (_transfer_body(usd, {"id": random_id()}), 404, "not-found"),
        (_transfer_body(usd, usd2, "1.001"), 422, "invalid-amount"),
        ({"from_account_id": usd["id"], "amount": "1.00"}, 422, "validation-error"),
        ({**_transfer_body(usd, usd2), "from_account_id": "nope"}, 422, "validation-error"),
    ]
    before = books()
    for body, status, code in cases:
        problem(post_money(client, jane, "/transfers", body), status, code)
    assert books() == before
    assert ledger.verify() == []


# ---------------------------------------------------------------------------
# P2P


def test_p2p_pays_into_the_recipients_primary_account(client, jane, john):
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "100.00")
    johns_first = open_account(client, john)
    johns_primary = open_account(client, john, name="Main")
    ok(client.simulate_post(f"{API}/accounts/{johns_primary['id']}/primary",
                            headers=john.headers), 200)
    result = post_money(client, jane, "/p2p", {"recipient_email": john.email.upper(),
                                               "amount": "12.00", "note": "Pizza"})
    body = ok(result, 201)
    assert result.headers["location"] == f"{API}/p2p/{body['id']}"
    assert (body["direction"], body["account_id"], body["amount"], body["note"],
            body["counterparty"]) == ("sent", mine["id"], "12.00", "Pizza",
                                      {"kind": "user", "account_id": None,
                                       "user_id": str(john.id), "name": "John S."})
    assert balance(client, john, johns_primary["id"]) == "12.00"
    assert balance(client, john, johns_first["id"]) == "0.00"
    assert balance(client, jane, mine["id"]) == "88.00"
    # John sees it as received, into his account, from Jane; never Jane's account id.
    theirs = ok(client.simulate_get(result.headers["location"], headers=john.headers), 200)
    assert (theirs["direction"], theirs["account_id"], theirs["counterparty"]["name"],
            theirs["counterparty"]["user_id"]) == ("received", johns_primary["id"], "Jane D.",
                                                   str(jane.id))
    assert mine["id"] not in json.dumps(theirs)
    assert len(audit_rows("p2p.create", body["id"])) == 1


@pytest.mark.parametrize("how", ["recipient_user_id", "recipient_email", "recipient"])
def test_p2p_recipient_can_be_named_by_email_or_user_id(client, jane, john, how):
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "10.00")
    johns = open_account(client, john)
    value = {"recipient_user_id": str(john.id), "recipient_email": john.email,
             "recipient": str(john.id)}[how]
    body = ok(post_money(client, jane, "/p2p", {how: value, "amount": "1.00",
                                                "from_account_id": mine["id"]}), 201)
    assert body["counterparty"]["user_id"] == str(john.id)
    assert balance(client, john, johns["id"]) == "1.00"


def test_each_p2p_refusal_has_its_own_type_and_moves_nothing(client, jane, john, make_user):
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "10.00")
    open_account(client, john, currency="EUR")  # John's primary is in euros
    homeless = make_user()  # no account at all
    frozen_user = make_user()
    frozen = open_account(client, frozen_user)
    Account.update(status="suspended").where(Account.id == frozen["id"]).execute()
    suspended_user = make_user()
    open_account(client, suspended_user)
    User.update(status="suspended").where(User.id == suspended_user.id).execute()
    cases = [
        # A recipient who cannot be paid looks like one who does not exist (see below).
        ({"recipient_email": john.email, "amount": "1.00"}, 404, "not-found"),
        ({"recipient_email": jane.email, "amount": "1.00"}, 422, "same-account"),
        ({"recipient_user_id": str(jane.id), "amount": "1.00"}, 422, "same-account"),
        ({"recipient_email": "nobody@example.com", "amount": "1.00"}, 404, "not-found"),
        ({"recipient_user_id": random_id(), "amount": "1.00"}, 404, "not-found"),
        ({"recipient_email": homeless.email, "amount": "1.00"}, 404, "not-found"),
        ({"recipient_email": suspended_user.email, "amount": "1.00"}, 404, "not-found"),
        ({"recipient_email": frozen_user.email, "amount": "1.00"}, 404, "not-found"),
        ({"recipient_email": john.email, "recipient_user_id": str(john.id), "amount": "1.00"},
         422, "validation-error"),
        ({"amount": "1.00"}, 422, "validation-error"),
        ({"recipient_email": frozen_user.email, "amount": "1.001"}, 422, "invalid-amount"),
    ]
    before = books()
    for body, status, code in cases:
        problem(post_money(client, jane, "/p2p", body), status, code)
    assert books() == before
    # Not enough money, and someone else's account as the source.
    friend = make_user()
    open_account(client, friend)
    problem(post_money(client, jane, "/p2p", {"recipient_email": friend.email,
                                              "amount": "10.01"}), 422, "insufficient-funds")
    theirs = open_account(client, john, name="Johns USD")
    problem(post_money(client, jane, "/p2p", {"recipient_email": friend.email, "amount": "1.00",
                                              "from_account_id": theirs["id"]}), 404,
            "not-found")
    assert books()[:3] == before[:3]


def test_every_recipient_who_cannot_be_paid_gets_one_identical_answer(client, jane, john,
                                                                       make_user):
    """Registered or not, a stranger learns nothing from why a payment was refused."""
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "10.00")
    homeless = make_user()  # registered, no account at all
    closed_user = make_user()
    closed = open_account(client, closed_user)
    ok(client.simulate_post(f"{API}/accounts/{closed['id']}/close", headers=closed_user.headers),
       200)
    frozen_user = make_user()
    frozen = open_account(client, frozen_user)
    Account.update(status="suspended").where(Account.id == frozen["id"]).execute()
    euro_user = make_user()
    open_account(client, euro_user, currency="EUR")
    suspended_user = make_user()
    open_account(client, suspended_user)
    User.update(status="suspended").where(User.id == suspended_user.id).execute()
    recipients = [
        {"recipient_email": "nobody-at-all@example.com"},
        {"recipient": "nobody-at-all@example.com"},
        {"recipient_user_id": random_id()},
        {"recipient": "not-even-an-id"},
        {"recipient_email": homeless.email},
        {"recipient": str(homeless.id)},
        {"recipient_email": closed_user.email},
        {"recipient_email": frozen_user.email},
        {"recipient_email": euro_user.email},
        {"recipient_email": suspended_user.email},
    ]
    before = books()
    answers = []
    for recipient in recipients:
        resp = post_money(client, jane, "/p2p", {**recipient, "amount": "1.00"})
        body = problem(resp, 404, "not-found")
        answers.append((resp.status_code, resp.headers["Content-Type"],
                        {k: v for k, v in body.items() if k != "request_id"}))
    assert all(answer == answers[0] for answer in answers), answers
    assert books() == before


def test_a_recipient_frozen_after_the_lookup_gets_the_same_answer(client, jane, make_user,
                                                                  monkeypatch):
    """The ledger's own refusal names the recipient's account: it must not reach the sender."""
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "10.00")
    friend = make_user()
    theirs = open_account(client, friend)
    looked_up = movements.find_recipient

    def then_frozen(*args, **kwargs):
        found = looked_up(*args, **kwargs)
        Account.update(status="suspended").where(Account.id == theirs["id"]).execute()
        return found

    monkeypatch.setattr(movements, "find_recipient", then_frozen)
    body = problem(post_money(client, jane, "/p2p", {"recipient_email": friend.email,
                                                     "amount": "1.00"}), 404, "not-found")
    assert body["detail"] == movements.RECIPIENT_NOT_FOUND
    assert theirs["id"] not in json.dumps(body)


def test_p2p_without_a_primary_account_of_my_own_needs_a_source(client, jane, john):
    open_account(client, john)
    problem(post_money(client, jane, "/p2p", {"recipient_email": john.email, "amount": "1.00"}),
            404, "not-found")


def test_lists_of_transfers_and_payments_show_what_i_made(client, jane, john):
    a, b = open_account(client, jane), open_account(client, jane)
    deposit(client, jane, a["id"], "50.00")
    open_account(client, john)
    t = transfer(client, jane, a["id"], b["id"], "5.00")
    p = pay(client, jane, john, "2.00")
    transfers = ok(client.simulate_get(f"{API}/transfers", headers=jane.headers), 200)
    assert [x["id"] for x in transfers["items"]] == [t["id"]]
    assert transfers["next_cursor"] is None
    payments = ok(client.simulate_get(f"{API}/p2p", headers=jane.headers), 200)
    assert [(x["id"], x["direction"]) for x in payments["items"]] == [(p["id"], "sent")]
    received = ok(client.simulate_get(f"{API}/p2p", headers=john.headers,
                                      params={"direction": "received"}), 200)
    assert [x["id"] for x in received["items"]] == [p["id"]]
    assert ok(client.simulate_get(f"{API}/p2p", headers=john.headers,
                                  params={"direction": "sent"}), 200)["items"] == []
    assert ok(client.simulate_get(f"{API}/transfers", headers=john.headers), 200)["items"] == []
    assert ledger.verify() == []


@pytest.mark.parametrize("extra, status, code", [
    ({"amount": "99999.00"}, 422, "insufficient-funds"),
    ({"amount": "1.00", "currency": "EUR"}, 422, "currency-mismatch"),
])
def test_what_the_sender_cannot_pay_is_refused_alike_whoever_the_recipient_is(
        client, jane, make_user, extra, status, code):
    """Found by attacking the API: these answers once told registered from unknown emails."""
    mine = open_account(client, jane)
    deposit(client, jane, mine["id"], "10.00")
    registered = make_user()
    open_account(client, registered)
    squatter = make_user(verified=False)
    open_account(client, squatter)
    bodies = []
    for email in (registered.email, squatter.email, "nobody-here@example.com"):
        body = problem(post_money(client, jane, "/p2p", {"recipient_email": email, **extra}),
                       status, code)
        bodies.append({k: v for k, v in body.items() if k not in ("instance", "request_id")})
    assert bodies[0] == bodies[1] == bodies[2]
    assert get_account(client, jane, mine["id"])["balance"] == "10.00"
