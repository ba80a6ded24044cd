"""The ledger on both backends: exact balances and entries, refusals that write nothing,
reversals once only, verify() that catches drift, and money that stays whole under races.
"""

import random
import threading
import uuid
from collections import Counter

import pytest

from hoardrun import errors, ledger
from hoardrun.db import db
from hoardrun.models import Account, P2PTransaction, Transaction, Transfer, User

USD, EUR = "USD", "EUR"


def make_user(uid, **fields):
    return User.create(email=f"{uid('u')}@example.com", first_name="Ann", last_name="Lee",
                       password_hash="not-a-real-hash", **fields)


def make_account(user, currency=USD, *, overdraft=0, status="active", number=None):
    # Straight through the model: these tests are about the ledger, not about
    # opening accounts. The balance starts at zero and only the ledger moves it.
    return Account.create(user=user, account_number=number or str(uuid.uuid4().int)[:11],
                          name="Acc", type="checking", currency=currency,
                          overdraft_limit=overdraft, status=status,
                          closed_at=None if status != "closed" else _now())


def _now():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc)


def balance(account):
    return Account.get_by_id(account.id).balance


def set_status(account, status):
    (Account
     .update(status=status, closed_at=_now() if status == "closed" else None)
     .where(Account.id == account.id)
     .execute())


def entries(movement_id):
    return list(Transaction
                .select()
                .where(Transaction.movement_id == movement_id)
                .order_by(Transaction.direction))


def row_counts():
    """Everything a money movement could write, and every balance."""
    return (Transaction.select().count(), Transfer.select().count(),
            P2PTransaction.select().count(),
            sorted((str(a.id), a.balance) for a in Account.select()))


def assert_pair(posting, amount, *, debit, credit, debit_balance, credit_balance):
    """Two entries, equal amount, opposite directions, one movement, right balance_after."""
    inbound, outbound = entries(posting.movement_id)  # 'inbound' sorts before 'outbound'
    assert (inbound.direction, outbound.direction) == ("inbound", "outbound")
    assert inbound.amount == outbound.amount == amount
    assert inbound.movement_id == outbound.movement_id == posting.movement_id
    assert outbound.account_id == debit.id and inbound.account_id == credit.id
    assert outbound.balance_after == debit_balance == posting.debit.balance_after
    assert inbound.balance_after == credit_balance == posting.credit.balance_after
    assert posting.amount == amount
    return inbound, outbound


@pytest.fixture
def world(database, uid):
    alice, bob = make_user(uid), make_user(uid)
    w = type("World", (), {})()
    w.alice, w.bob = alice, bob
    w.a1 = make_account(alice)
    w.a2 = make_account(alice)
    w.a_eur = make_account(alice, EUR)
    w.b1 = make_account(bob)
    return w


# ---------------------------------------------------------------------------
# Happy paths


def settlement_total(currency):
    """What the currency's settlement buckets hold together."""
    return sum(balance(Account.get_by_id(i)) for i in ledger.settlement_account_ids(currency))


def test_deposit_credits_the_account_against_the_settlement_account(world):
    posting = ledger.deposit(world.a1.id, 10_000, description="Salary")
    settlement = Account.get_by_id(posting.debit.account_id)
    assert (settlement.type, settlement.currency) == ("settlement", USD)
    assert ledger.settlement_account_ids(USD) == [settlement.id]
    inbound, outbound = assert_pair(posting, 10_000, debit=settlement, credit=world.a1,
                                    debit_balance=-10_000, credit_balance=10_000)
    assert (inbound.type, outbound.type) == ("deposit", "settlement")
    assert inbound.description == "Salary"
    assert balance(world.a1) == 10_000
    assert balance(settlement) == -10_000


def test_withdraw_debits_the_account(world):
    ledger.deposit(world.a1.id, 5_000)
    posting = ledger.withdraw(world.a1.id, 1_234)
    settlement = Account.get_by_id(posting.credit.account_id)
    assert (settlement.type, settlement.currency) == ("settlement", USD)
    # The deposit may have used another bucket: the leg shows this bucket's own balance.
    inbound, outbound = assert_pair(posting, 1_234, debit=world.a1, credit=settlement,
                                    debit_balance=3_766, credit_balance=balance(settlement))
    assert (inbound.type, outbound.type) == ("settlement", "withdrawal")
    assert balance(world.a1) == 3_766
    assert settlement_total(USD) == -3_766


def test_transfer_moves_money_between_own_accounts_and_records_the_transfer(world):
    ledger.deposit(world.a1.id, 5_000)
    posting = ledger.transfer(world.alice.id, world.a1.id, world.a2.id, 2_000,
                              description="Savings")
    inbound, outbound = assert_pair(posting, 2_000, debit=world.a1, credit=world.a2,
                                    debit_balance=3_000, credit_balance=2_000)
    assert (inbound.type, outbound.type) == ("transfer_in", "transfer_out")
    row = Transfer.get_by_id(posting.movement_id)
    assert (row.user_id, row.from_account_id, row.to_account_id, row.amount, row.currency,
            row.status) == (world.alice.id, world.a1.id, world.a2.id, 2_000, USD, "completed")
    assert row.reference == ledger.new_reference("TRF", posting.movement_id)
    assert inbound.transfer_id == outbound.transfer_id == row.id
    assert (balance(world.a1), balance(world.a2)) == (3_000, 2_000)


def test_p2p_payment_moves_money_to_another_user_and_records_it(world):
    ledger.deposit(world.a1.id, 5_000)
    posting = ledger.p2p_payment(world.alice.id, world.a1.id, world.b1.id, 1_500, note="Lunch")
    inbound, outbound = assert_pair(posting, 1_500, debit=world.a1, credit=world.b1,
                                    debit_balance=3_500, credit_balance=1_500)
    assert (inbound.type, outbound.type) == ("p2p_in", "p2p_out")
    row = P2PTransaction.get_by_id(posting.movement_id)
    assert (row.sender_id, row.recipient_id, row.sender_account_id, row.recipient_account_id,
            row.amount, row.note) == (world.alice.id, world.bob.id, world.a1.id, world.b1.id,
                                      1_500, "Lunch")
    assert inbound.p2p_id == outbound.p2p_id == row.id


def test_reverse_puts_the_money_back_once_with_entries_pointing_at_the_originals(world):
    ledger.deposit(world.a1.id, 5_000)
    original = ledger.transfer(world.alice.id, world.a1.id, world.a2.id, 2_000)
    reversal = ledger.reverse(original.credit.entry_id, description="Mistake")
    # Money flows back: the account that was credited is debited.
    inbound, outbound = assert_pair(reversal, 2_000, debit=world.a2, credit=world.a1,
                                    debit_balance=0, credit_balance=5_000)
    assert (inbound.type, outbound.type) == ("reversal", "reversal")
    assert outbound.reverses_id == original.credit.entry_id
    assert inbound.reverses_id == original.debit.entry_id
    # Either entry of the original, and the reversal itself, are refused now.
    before = row_counts()
    for entry_id in (original.credit.entry_id, original.debit.entry_id,
                     reversal.debit.entry_id):
        with pytest.raises(errors.ReversalNotAllowed):
            ledger.reverse(entry_id)
    assert row_counts() == before
    assert (balance(world.a1), balance(world.a2)) == (5_000, 0)
    assert ledger.verify() == []


def test_unknown_entry_cannot_be_reversed(world):
    with pytest.raises(errors.NotFound):
        ledger.reverse(uuid.uuid4())


# ---------------------------------------------------------------------------
# Refusals: each its own error, and nothing written


def test_overdraft_edge_is_allowed_and_one_minor_unit_more_is_refused(database, uid):
    user = make_user(uid)
    acc = make_account(user, overdraft=1_000)
    ledger.deposit(acc.id, 500)
    before = row_counts()
    with pytest.raises(errors.InsufficientFunds):
        ledger.withdraw(acc.id, 1_501)
    assert row_counts() == before
    posting = ledger.withdraw(acc.id, 1_500)  # exactly down to -overdraft_limit
    assert posting.debit.balance_after == -1_000 == balance(acc)
    before = row_counts()
    with pytest.raises(errors.InsufficientFunds):
        ledger.withdraw(acc.id, 1)
    assert row_counts() == before


REFUSALS = {
    "insufficient funds (withdraw)":
        (errors.InsufficientFunds, lambda w: ledger.withdraw(w.a1.id, 5_001)),
    "insufficient funds (transfer)":
        (errors.InsufficientFunds,
         lambda w: ledger.transfer(w.alice.id, w.a1.id, w.a2.id, 5_001)),
    "insufficient funds (p2p)":
        (errors.InsufficientFunds,
         lambda w: ledger.p2p_payment(w.alice.id, w.a1.id, w.b1.id, 5_001)),
    "closed source":
        (errors.AccountNotActive, lambda w: (set_status(w.a2, "closed"),
                                             ledger.transfer(w.alice.id, w.a2.id, w.a1.id, 1))),
    "closed destination":
        (errors.AccountNotActive, lambda w: (set_status(w.a2, "closed"),
                                             ledger.transfer(w.alice.id, w.a1.id, w.a2.id, 1))),
    "deposit into a closed account":
        (errors.AccountNotActive, lambda w: (set_status(w.a2, "closed"),
                                             ledger.deposit(w.a2.id, 1))),
    "suspended (frozen) source":
        (errors.AccountNotActive, lambda w: (set_status(w.a1, "suspended"),
                                             ledger.withdraw(w.a1.id, 1))),
    "suspended recipient":
        (errors.AccountNotActive, lambda w: (set_status(w.b1, "suspended"),
                                             ledger.p2p_payment(w.alice.id, w.a1.id, w.b1.id, 1))),
    "currency mismatch USD to EUR":
        (errors.CurrencyMismatch,
         lambda w: ledger.transfer(w.alice.id, w.a1.id, w.a_eur.id, 100)),
    "requested currency differs from the accounts'":
        (errors.CurrencyMismatch,
         lambda w: ledger.transfer(w.alice.id, w.a1.id, w.a2.id, 100, currency=EUR)),
    "deposit in another currency":
        (errors.CurrencyMismatch, lambda w: ledger.deposit(w.a1.id, 100, currency=EUR)),
    "self-transfer":
        (errors.SameAccount, lambda w: ledger.transfer(w.alice.id, w.a1.id, w.a1.id, 100)),
    "paying yourself":
        (errors.SameAccount, lambda w: ledger.p2p_payment(w.alice.id, w.a1.id, w.a2.id, 100)),
    "transfer from someone else's account":
        (errors.NotFound, lambda w: ledger.transfer(w.alice.id, w.b1.id, w.a1.id, 100)),
    "transfer into someone else's account":
        (errors.NotFound, lambda w: ledger.transfer(w.alice.id, w.a1.id, w.b1.id, 100)),
    "p2p from someone else's account":
        (errors.NotFound, lambda w: ledger.p2p_payment(w.alice.id, w.b1.id, w.a1.id, 100)),
    "withdraw from someone else's account":
        (errors.NotFound, lambda w: ledger.withdraw(w.b1.id, 100, user_id=w.alice.id)),
    "deposit into an unknown account":
        (errors.NotFound, lambda w: ledger.deposit(uuid.uuid4(), 100)),
    "zero amount": (errors.AmountError, lambda w: ledger.deposit(w.a1.id, 0)),
    "negative amount": (errors.AmountError, lambda w: ledger.withdraw(w.a1.id, -5)),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_is_its_own_error_and_writes_nothing(world, case):
    error, attempt = REFUSALS[case]
    ledger.deposit(world.a1.id, 5_000)
    ledger.deposit(world.b1.id, 5_000)
    before = row_counts()
    transactions_before = Transaction.select().count()
    with pytest.raises(error) as info:
        attempt(world)
    # The exact class, not a parent: each refusal has its own problem type.
    assert type(info.value) is error
    counts = row_counts()
    assert counts[:3] == before[:3] and counts[0] == transactions_before
    assert counts[3] == before[3]  # no balance moved
    assert ledger.verify() == []


# ---------------------------------------------------------------------------
# verify()


def test_verify_is_clean_after_every_kind_of_movement(world):
    ledger.deposit(world.a1.id, 9_000)
    ledger.deposit(world.a_eur.id, 700)
    ledger.withdraw(world.a1.id, 1_000)
    t = ledger.transfer(world.alice.id, world.a1.id, world.a2.id, 3_000)
    ledger.reverse(t.debit.entry_id)
    ledger.p2p_payment(world.alice.id, world.a1.id, world.b1.id, 1_000)
    assert ledger.verify() == []
    assert (balance(world.a1), balance(world.a2), balance(world.b1),
            balance(world.a_eur)) == (7_000, 0, 1_000, 700)


def test_verify_reports_a_balance_that_drifted_from_its_entries(world):
    ledger.deposit(world.a1.id, 5_000)
    assert ledger.verify() == []
    # Only behind the database's back now (migration 010 refuses it at COMMIT):
    # a superuser with the triggers off.
    with db.atomic():
        db.execute_sql("SET LOCAL session_replication_role = replica")
        db.execute_sql(f"UPDATE accounts SET balance = balance + 1 WHERE id = {db.obj.param}",
                       (world.a1.id.hex,))
    problems = ledger.verify()
    assert any(str(world.a1.id) in p or world.a1.id.hex in p for p in problems), problems
    assert any("currency USD" in p for p in problems), problems


# ---------------------------------------------------------------------------
# Races


@pytest.mark.slow
def test_racing_transfers_and_payments_keep_the_books_whole(database, uid):
    """8 threads, 240 random transfers and P2P payments over 6 small shared accounts."""
    users = [make_user(uid) for _ in range(3)]
    accounts = []
    for i, user in enumerate(users):
        for j in range(2):
            # Small balances and overdraft on half of them: refusals are frequent.
            acc = make_account(user, overdraft=2_000 if (i + j) % 2 else 0)
            ledger.deposit(acc.id, 3_000)
            accounts.append(acc)
    transfers_before = Transfer.select().count()
    p2p_before = P2PTransaction.select().count()
    db.close()

    threads, per_thread = 8, 30
    outcomes = Counter()
    failures = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(seed):
        rng = random.Random(seed)
        local = Counter()
        try:
            start.wait()
            for _ in range(per_thread):
                src = rng.choice(accounts)
                amount = rng.randint(1, 2_500)
                try:
                    if rng.random() < 0.5:
                        sibling = next(a for a in accounts
                                       if a.user_id == src.user_id and a.id != src.id)
                        pair = (src, sibling) if rng.random() < 0.5 else (sibling, src)
                        ledger.transfer(src.user_id, pair[0].id, pair[1].id, amount)
                        local["transfer"] += 1
                    else:
                        dst = rng.choice([a for a in accounts if a.user_id != src.user_id])
                        ledger.p2p_payment(src.user_id, src.id, dst.id, amount)
                        local["p2p"] += 1
                except errors.InsufficientFunds:
                    local["insufficient"] += 1
        except Exception as exc:  # recorded, then failed on the main thread
            with lock:
                failures.append(repr(exc))
        finally:
            db.close()
            with lock:
                outcomes.update(local)

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    assert failures == []
    assert sum(outcomes.values()) == threads * per_thread
    assert outcomes["transfer"] > 0 and outcomes["p2p"] > 0
    assert outcomes["insufficient"] > 0  # the race really pushed against the limits
    for acc in Account.select().where(Account.type != "settlement"):
        assert acc.balance >= -acc.overdraft_limit, (acc.id, acc.balance, acc.overdraft_limit)
    assert ledger.verify() == []
    total = db.execute_sql("SELECT currency, SUM(balance) FROM accounts GROUP BY currency")
    assert {c: int(s) for c, s in total} == {USD: 0}
    # Every success is exactly one row and two entries; nothing half-written.
    assert Transfer.select().count() - transfers_before == outcomes["transfer"]
    assert P2PTransaction.select().count() - p2p_before == outcomes["p2p"]
    moved = (Transaction.select()
             .where(Transaction.type.in_(["transfer_in", "transfer_out", "p2p_in", "p2p_out"]))
             .count())
    assert moved == 2 * (outcomes["transfer"] + outcomes["p2p"])
