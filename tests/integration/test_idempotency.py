"""Idempotency-Key on money-moving POSTs, on both backends.

A replay returns the first response (same status, same body) and moves
nothing; the same key with another request is 422; keys are per user; five
threads sending one key at once move money once; a failure between claiming
a key and finishing leaves neither money moved nor the key stuck.
"""

import threading
import time

import pytest
from money_helpers import (
    deposit, field_names, get_account, ok, open_account, post_money, problem,
)

from hoardrun import ledger, movements
from hoardrun.models import IdempotencyKey, Transaction


@pytest.fixture
def funded(client, jane):
    """Jane's two USD accounts, the first holding 100.00."""
    a = open_account(client, jane)
    b = open_account(client, jane, name="Savings")
    deposit(client, jane, a["id"], "100.00")
    return a, b


def entries():
    return Transaction.select().count()


def test_a_replay_returns_the_first_response_and_moves_nothing(client, jane, funded):
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "30.00"}
    first = post_money(client, jane, "/transfers", body, key="trf-001")
    assert first.status_code == 201 and first.headers["idempotent-replayed"] == "false"
    moved = entries()
    # Same request again, keys in another order: the same request.
    again = post_money(client, jane, "/transfers", dict(reversed(list(body.items()))),
                       key="trf-001")
    assert again.status_code == 201
    assert again.content == first.content  # byte for byte
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert entries() == moved
    assert get_account(client, jane, a["id"])["balance"] == "70.00"


def test_the_same_key_with_another_body_or_path_is_422_and_moves_nothing(client, jane, funded):
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "30.00"}
    ok(post_money(client, jane, "/transfers", body, key="k-1"), 201)
    moved = entries()
    result = post_money(client, jane, "/transfers", {**body, "amount": "31.00"}, key="k-1")
    assert "Idempotency-Key" in field_names(problem(result, 422, "idempotency-key-reused"))
    result = post_money(client, jane, f"/accounts/{a['id']}/withdrawals", {"amount": "30.00"},
                        key="k-1")
    problem(result, 422, "idempotency-key-reused")
    assert entries() == moved
    assert get_account(client, jane, a["id"])["balance"] == "70.00"


def test_keys_belong_to_one_user(client, jane, funded, make_user):
    john = make_user()
    johns = open_account(client, john)
    a, _ = funded
    ok(post_money(client, jane, f"/accounts/{a['id']}/deposits", {"amount": "1.00"}, key="same"),
       201)
    # John's "same" is his own key: his deposit runs, and is no replay of Jane's.
    result = post_money(client, john, f"/accounts/{johns['id']}/deposits", {"amount": "1.00"},
                        key="same")
    assert result.status_code == 201 and result.headers["idempotent-replayed"] == "false"
    assert get_account(client, john, johns["id"])["balance"] == "1.00"
    assert get_account(client, jane, a["id"])["balance"] == "101.00"


def test_a_refusal_is_the_first_response_and_is_replayed_too(client, jane, funded):
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "500.00"}
    first = post_money(client, jane, "/transfers", body, key="big")
    problem(first, 422, "insufficient-funds")
    deposit(client, jane, a["id"], "1000.00")
    moved = entries()
    again = post_money(client, jane, "/transfers", body, key="big")
    assert again.status_code == 422 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert entries() == moved
    # A new key is a new request.
    ok(post_money(client, jane, "/transfers", body, key="big-2"), 201)


def test_without_a_key_every_post_moves_money(client, jane, funded):
    a, _ = funded
    for _ in range(2):
        ok(post_money(client, jane, f"/accounts/{a['id']}/withdrawals", {"amount": "1.00"}), 201)
    assert get_account(client, jane, a["id"])["balance"] == "98.00"
    assert IdempotencyKey.select().count() == 0


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "ключ"])
def test_an_unusable_key_is_422_naming_the_header(client, jane, funded, key):
    a, _ = funded
    moved = entries()
    result = post_money(client, jane, f"/accounts/{a['id']}/deposits", {"amount": "1.00"},
                        key=key)
    assert result.status_code == 422, result.text
    assert any("idempotency-key" in f.lower() for f in field_names(result.json))
    assert entries() == moved


def test_a_failure_after_the_claim_leaves_no_money_moved_and_the_key_usable(client, jane,
                                                                            funded, monkeypatch):
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "10.00"}
    moved = entries()

    def crash(*args, **kwargs):
        # After the ledger call, before the commit: like a process dying mid-request.
        raise RuntimeError("lost the connection")

    monkeypatch.setattr(movements.audit, "record", crash)
    problem(post_money(client, jane, "/transfers", body, key="retry-me"), 500, "internal-error")
    assert entries() == moved
    assert IdempotencyKey.select().count() == 0
    monkeypatch.undo()
    result = post_money(client, jane, "/transfers", body, key="retry-me")
    assert result.status_code == 201 and result.headers["idempotent-replayed"] == "false"
    assert entries() == moved + 2
    assert get_account(client, jane, a["id"])["balance"] == "90.00"


def _race(client, person, path, body, *, keys, monkeypatch):
    """POST from one thread per key, all at once; return the results.

    The movement is slowed down while it holds its transaction, so the other
    requests really arrive while the first is still in flight.
    """
    real = movements.ledger.transfer if path == "/transfers" else movements.ledger.p2p_payment
    name = "transfer" if path == "/transfers" else "p2p_payment"

    def slow(*args, **kwargs):
        posting = real(*args, **kwargs)
        time.sleep(0.2)
        return posting

    monkeypatch.setattr(movements.ledger, name, slow)
    results = [None] * len(keys)
    barrier = threading.Barrier(len(keys))

    def send(i):
        barrier.wait()
        results[i] = post_money(client, person, path, body, key=keys[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_five_threads_with_one_key_move_money_once(client, jane, funded, monkeypatch):
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "25.00"}
    moved = entries()
    results = _race(client, jane, "/transfers", body, keys=["race"] * 5, monkeypatch=monkeypatch)
    assert [r.status_code for r in results] == [201] * 5, [r.text for r in results]
    assert len({r.content for r in results}) == 1  # one body, five times
    assert sorted(r.headers["idempotent-replayed"] for r in results) == ["false"] + ["true"] * 4
    assert entries() == moved + 2
    assert get_account(client, jane, a["id"])["balance"] == "75.00"
    assert get_account(client, jane, b["id"])["balance"] == "25.00"
    assert ledger.verify() == []


@pytest.mark.slow
def test_five_threads_with_one_key_pay_another_user_once(client, jane, funded, make_user,
                                                         monkeypatch):
    a, _ = funded
    john = make_user()
    johns = open_account(client, john)
    body = {"recipient_email": john.email, "from_account_id": a["id"], "amount": "7.00"}
    results = _race(client, jane, "/p2p", body, keys=["pay-once"] * 5, monkeypatch=monkeypatch)
    assert [r.status_code for r in results] == [201] * 5, [r.text for r in results]
    assert len({r.content for r in results}) == 1
    assert get_account(client, john, johns["id"])["balance"] == "7.00"
    assert ledger.verify() == []


@pytest.mark.slow
def test_five_threads_with_five_keys_move_money_five_times(client, jane, funded, monkeypatch):
    """The control: the same race without a shared key really moves money each time."""
    a, b = funded
    body = {"from_account_id": a["id"], "to_account_id": b["id"], "amount": "10.00"}
    results = _race(client, jane, "/transfers", body, keys=[f"k{i}" for i in range(5)],
                    monkeypatch=monkeypatch)
    assert [r.status_code for r in results] == [201] * 5
    assert len({r.json["id"] for r in results}) == 5
    assert get_account(client, jane, a["id"])["balance"] == "50.00"
