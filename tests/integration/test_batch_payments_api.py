"""Atomic multi-leg payments through HTTP: every leg or none, each failing leg named."""

import http.client
import json
import random
import threading

import pytest

from hoardrun import ledger
from hoardrun.models import Account, AuditLog, P2PTransaction, Transaction, Transfer
from money_helpers import deposit, get_account, ok, open_account, post_money, problem
from tests.integration.conftest import LiveServer

API = "/api/v1"
TYPE = "https://hoardrun.dev/problems/"


def batch(client, person, legs, key=None):
    return post_money(client, person, "/payments/batch", {"legs": legs}, key=key)


def leg(source, amount, **to):
    return {"from_account_id": source, "amount": amount, **to}


@pytest.fixture
def jane(make_user):
    return make_user()


@pytest.fixture
def bob(make_user):
    return make_user()


def balances(client, person, *ids):
    return [get_account(client, person, i)["balance"] for i in ids]


def nothing_moved():
    return (Transfer.select().count(), P2PTransaction.select().count(),
            Transaction.select().where(Transaction.type.not_in(["deposit", "settlement"])).count()) == (0, 0, 0)


def test_a_batch_of_transfers_and_payments_moves_every_leg(client, jane, bob, make_user):
    carol = make_user()
    a = open_account(client, jane)["id"]
    b = open_account(client, jane, name="Savings")["id"]
    bob_main = open_account(client, bob)["id"]
    carol_main = open_account(client, carol)["id"]
    deposit(client, jane, a, "100.00")
    body = ok(batch(client, jane, [
        leg(a, "10.00", to_account_id=b, description="rainy day"),
        leg(a, "12.50", recipient_email=bob.email, description="dinner"),
        leg(a, "7.25", recipient_user_id=str(carol.id)),
    ], key="split-1"), 201)
    kinds = [(l["index"], l["kind"], l["amount"]) for l in body["legs"]]
    assert kinds == [(0, "transfer", "10.00"), (1, "p2p", "12.50"), (2, "p2p", "7.25")]
    assert body["legs"][0]["to_account_id"] == b
    # A payment to a user shows who, never their account.
    assert body["legs"][1]["to_account_id"] is None
    assert body["legs"][1]["counterparty"]["user_id"] == str(bob.id)
    assert balances(client, jane, a, b) == ["70.25", "10.00"]
    assert balances(client, bob, bob_main) == ["12.50"]
    assert balances(client, carol, carol_main) == ["7.25"]
    # Each leg is an ordinary transfer or payment of its own.
    assert ok(client.simulate_get(f"{API}/transfers/{body['legs'][0]['id']}",
                                  headers=jane.headers), 200)["description"] == "rainy day"
    assert ok(client.simulate_get(f"{API}/p2p/{body['legs'][1]['id']}",
                                  headers=bob.headers), 200)["note"] == "dinner"
    assert AuditLog.select().where(AuditLog.action == "batch.create").count() == 1
    # One key for the whole batch: a retry replays it and moves nothing again.
    again = batch(client, jane, [
        leg(a, "10.00", to_account_id=b, description="rainy day"),
        leg(a, "12.50", recipient_email=bob.email, description="dinner"),
        leg(a, "7.25", recipient_user_id=str(carol.id)),
    ], key="split-1")
    assert again.status_code == 201 and again.json == body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert balances(client, jane, a) == ["70.25"]
    problem(batch(client, jane, [leg(a, "1.00", to_account_id=b)], key="split-1"), 422,
            "idempotency-key-reused")
    assert ledger.verify() == []


def test_a_batch_that_fails_on_its_last_leg_moves_nothing(client, jane, bob):
    a = open_account(client, jane)["id"]
    b = open_account(client, jane, name="Savings")["id"]
    open_account(client, bob)
    deposit(client, jane, a, "50.00")
    body = problem(batch(client, jane, [
        leg(a, "20.00", to_account_id=b),
        leg(a, "20.00", recipient_email=bob.email),
        leg(a, "20.00", to_account_id=b),
    ]), 422, "batch-refused")
    assert body["legs"] == [{"index": 2, "type": TYPE + "insufficient-funds",
                             "detail": "insufficient funds"}]
    assert balances(client, jane, a, b) == ["50.00", "0.00"]
    assert nothing_moved()
    assert ledger.verify() == []


def test_legs_see_the_earlier_legs_of_their_batch(client, jane):
    a = open_account(client, jane)["id"]
    b = open_account(client, jane, name="B")["id"]
    c = open_account(client, jane, name="C")["id"]
    deposit(client, jane, a, "100.00")
    ok(batch(client, jane, [leg(a, "100.00", to_account_id=b),
                            leg(b, "60.00", to_account_id=c),
                            leg(c, "60.00", to_account_id=a)]), 201)
    assert balances(client, jane, a, b, c) == ["60.00", "40.00", "0.00"]
    entries = ok(client.simulate_get(f"{API}/accounts/{a}/transactions",
                                     headers=jane.headers), 200)["items"]
    # Newest first, each entry's balance_after in the order the legs ran.
    assert [e["balance_after"] for e in entries] == ["60.00", "0.00", "100.00"]


def test_every_failing_leg_is_named_and_unpayable_recipients_look_alike(client, jane, bob,
                                                                         make_user):
    unverified = make_user(verified=False)
    open_account(client, unverified)
    open_account(client, bob)
    a = open_account(client, jane)["id"]
    b = open_account(client, jane, name="Savings")["id"]
    eur = open_account(client, jane, currency="EUR", name="Euro")["id"]
    mallory = make_user()
    theirs = open_account(client, mallory)["id"]
    deposit(client, jane, a, "100.00")
    body = problem(batch(client, jane, [
        leg(a, "1.00", to_account_id=b),                       # fine
        leg(a, "1.00", recipient_email="nobody@example.com"),  # unknown
        leg(a, "1.00", recipient_email=unverified.email),      # unverified
        leg(a, "1.001", to_account_id=b),                      # bad amount
        leg(theirs, "1.00", to_account_id=b),                  # not my account
        leg(a, "1.00", to_account_id=a),                       # same account
        leg(a, "1.00", to_account_id=eur),                     # currency
        leg(a, "1.00", to_account_id=theirs),                  # someone else's, as a transfer
        leg(a, "1.00", recipient_email=jane.email),            # myself
        leg(a, "1.00"),                                        # no destination
        leg(a, "1.00", to_account_id=b, recipient_email=bob.email),  # two
    ]), 422, "batch-refused")
    named = {f["index"]: f["type"].removeprefix(TYPE) for f in body["legs"]}
    assert named == {1: "not-found", 2: "not-found", 3: "invalid-amount", 4: "not-found",
                     5: "same-account", 6: "currency-mismatch", 7: "not-found",
                     8: "same-account", 9: "validation-error", 10: "validation-error"}
    by_index = {f["index"]: f for f in body["legs"]}
    assert by_index[1]["detail"] == by_index[2]["detail"]
    assert 0 not in by_index
    assert balances(client, jane, a, b) == ["100.00", "0.00"]
    assert nothing_moved()


def test_a_leg_the_sender_cannot_fund_says_so_whoever_its_recipient_is(client, jane, bob,
                                                                        make_user):
    """Found by attacking the API: insufficient-funds for bob, not-found for nobody."""
    open_account(client, bob)
    squatter = make_user(verified=False)
    open_account(client, squatter)
    a = open_account(client, jane)["id"]
    deposit(client, jane, a, "10.00")
    body = problem(batch(client, jane, [
        leg(a, "99999.00", recipient_email=bob.email),
        leg(a, "99999.00", recipient_email=squatter.email),
        leg(a, "99999.00", recipient_email="nobody-here@example.com"),
    ]), 422, "batch-refused")
    answers = {(f["type"], f["detail"]) for f in body["legs"]}
    assert len(body["legs"]) == 3 and len(answers) == 1
    assert {t.removeprefix(TYPE) for t, _ in answers} == {"insufficient-funds"}
    assert nothing_moved()


def test_a_recipient_frozen_after_the_look_up_is_the_same_not_found(client, jane, bob,
                                                                    monkeypatch):
    from hoardrun import movements

    bob_main = open_account(client, bob)["id"]
    a = open_account(client, jane)["id"]
    deposit(client, jane, a, "10.00")
    real = movements.find_recipients

    def then_freeze(*args, **kwargs):
        found = real(*args, **kwargs)
        Account.update(status="suspended").where(Account.id == bob_main).execute()
        return found

    monkeypatch.setattr(movements, "find_recipients", then_freeze)
    body = problem(batch(client, jane, [leg(a, "1.00", recipient_email=bob.email)]), 422,
                   "batch-refused")
    assert body["legs"] == [{"index": 0, "type": TYPE + "not-found",
                             "detail": movements.RECIPIENT_NOT_FOUND}]


def test_holds_reserve_money_a_batch_cannot_spend(client, jane):
    a = open_account(client, jane)["id"]
    b = open_account(client, jane, name="Savings")["id"]
    deposit(client, jane, a, "100.00")
    card = ok(client.simulate_post(f"{API}/cards", headers=jane.headers, json={
        "account_id": a, "type": "debit", "cardholder_name": "Jane Doe"}), 201)["id"]
    ok(post_money(client, jane, f"/cards/{card}/authorizations", {
        "merchant_name": "Hotel", "merchant_category": "7011", "amount": "80.00",
        "currency": "USD", "channel": "chip"}), 201)
    body = problem(batch(client, jane, [leg(a, "20.00", to_account_id=b),
                                        leg(a, "0.01", to_account_id=b)]), 422, "batch-refused")
    assert [f["index"] for f in body["legs"]] == [1]


def test_an_unverified_sender_cannot_pay_users_in_a_batch(client, make_user, bob):
    sender = make_user(verified=False)
    open_account(client, bob)
    a = open_account(client, sender)["id"]
    b = open_account(client, sender, name="Savings")["id"]
    deposit(client, sender, a, "10.00")
    problem(batch(client, sender, [leg(a, "1.00", to_account_id=b),
                                   leg(a, "1.00", recipient_email=bob.email)]), 403,
            "email-not-verified")
    ok(batch(client, sender, [leg(a, "1.00", to_account_id=b)]), 201)


@pytest.mark.parametrize("body", [
    {"legs": []},
    {},
    {"legs": "all of them"},
    {"legs": [{"amount": "1.00"}]},
    {"legs": [{"from_account_id": "not-a-uuid", "amount": "1.00"}]},
    {"legs": [{"from_account_id": "00000000-0000-0000-0000-000000000000", "amount": 1.5}]},
    {"legs": [{"from_account_id": "00000000-0000-0000-0000-000000000000",
               "amount": "1.00", "extra": True}]},
    {"legs": [{"from_account_id": "00000000-0000-0000-0000-000000000000",
               "amount": "1.00"}] * 101},
    {"legs": [], "surprise": 1},
])
def test_bad_batches_are_refused_and_move_nothing(client, jane, body):
    a = open_account(client, jane)["id"]
    deposit(client, jane, a, "10.00")
    result = client.simulate_post(f"{API}/payments/batch", headers=jane.headers, json=body)
    assert result.status_code == 422, result.text
    assert result.headers["content-type"] == "application/problem+json"
    assert balances(client, jane, a) == ["10.00"]
    assert nothing_moved()


def test_concurrent_batches_over_shared_accounts_never_deadlock(app, settings, client,
                                                                make_user):
    people = [make_user() for _ in range(4)]
    accounts = []
    for person in people:
        mine = [open_account(client, person, name=f"A{i}")["id"] for i in range(2)]
        for account in mine:
            deposit(client, person, account, "100.00")
        accounts.append(mine)
    statuses = []
    lock = threading.Lock()
    with LiveServer(app, settings, threads=8) as server:
        def run(n):
            rng = random.Random(n)
            me, conn = people[n % 4], http.client.HTTPConnection(server.host, server.port,
                                                                 timeout=60)
            for i in range(25):
                legs = []
                for _ in range(rng.randint(2, 8)):
                    src = rng.choice(accounts[n % 4])
                    if rng.random() < 0.5:
                        other = [x for x in accounts[n % 4] if x != src][0]
                        legs.append(leg(src, rng.choice(["1.00", "7.00", "30.00"]),
                                        to_account_id=other))
                    else:
                        legs.append(leg(src, rng.choice(["1.00", "7.00", "30.00"]),
                                        recipient_email=rng.choice(people).email))
                conn.request("POST", f"{API}/payments/batch", body=json.dumps({"legs": legs}),
                             headers={**me.headers, "Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses.append(response.status)
            conn.close()

        threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(statuses) == 200 and set(statuses) <= {201, 422}
    assert 201 in statuses
    assert ledger.verify() == []
