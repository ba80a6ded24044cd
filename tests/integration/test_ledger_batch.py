"""A batch writes exactly what its legs made one by one would have (migration 014).

``hoardrun_batch`` builds every leg's entries from per-account running
balances, seqs and chain hashes and writes them in one statement; these tests
hold it to the single-movement writer: contiguous seqs, continuous balances,
an intact hash chain, entries shaped like a single transfer's or payment's,
and the same answers and rows as migration 008's leg-by-leg batch.
"""

import importlib.util
import json
import random
import uuid

import peewee as pw
import psycopg2
import pytest

from hoardrun import chain, errors, ledger, schema
from hoardrun.models import Account, P2PTransaction, Transaction, Transfer, User

USD, EUR = "USD", "EUR"


def make_user(uid):
    return User.create(email=f"{uid('u')}@example.com", first_name="Ann", last_name="Lee",
                       password_hash="not-a-real-hash")


def make_account(user, currency=USD, *, overdraft=0, status="active"):
    return Account.create(user=user, account_number=str(uuid.uuid4().int)[:11], name="Acc",
                          type="checking", currency=currency, overdraft_limit=overdraft,
                          status=status)


def leg(source, target, amount, *, p2p=False, text=None):
    movement = uuid.uuid4()
    return ledger.BatchLeg(id=movement, p2p=p2p, from_account_id=source.id,
                           to_account_id=target.id, amount=amount,
                           reference=ledger.new_reference("P2P" if p2p else "TRF", movement),
                           text=text)


def history(account):
    return list(Transaction.select().where(Transaction.account_id == account.id)
                .order_by(Transaction.seq))


def assert_books_whole(*accounts):
    """Each account's seqs are 1..n, each balance_after follows from the one before, the
    stored balance is the last one, the chains hold and the books balance."""
    for account in accounts:
        rows = history(account)
        assert [e.seq for e in rows] == list(range(1, len(rows) + 1))
        running = 0
        for e in rows:
            running += e.amount if e.direction == "inbound" else -e.amount
            assert e.balance_after == running, (account.id, e.seq)
        assert Account.get_by_id(account.id).balance == running
    assert chain.verify_chain() == []
    assert ledger.verify() == []


# What an entry says besides its own identity, position, balance and time: a
# batch's leg and a single movement of the same kind must agree on all of it.
SHAPE = ("type", "direction", "amount", "currency", "description", "merchant_name",
         "merchant_category", "card_id", "reverses_id", "refund_of_id", "status", "symbol",
         "quantity")


def shape(entry):
    return {field: getattr(entry, field) for field in SHAPE}


def pair_of(movement_id):
    """The movement's (outbound, inbound) entries."""
    outbound, inbound = sorted(
        Transaction.select().where(Transaction.movement_id == movement_id),
        key=lambda e: e.direction != "outbound")
    return outbound, inbound


@pytest.fixture
def world(database, uid):
    alice, bob = make_user(uid), make_user(uid)
    w = type("World", (), {})()
    w.alice, w.bob = alice, bob
    w.a1, w.a2, w.b1 = make_account(alice), make_account(alice), make_account(bob)
    ledger.deposit(w.a1.id, 100_000)
    return w


def test_a_batch_writes_the_entries_single_movements_would(world):
    """Between single movements, a batch's entries continue and are continued by their chains,
    each leg shaped like the single transfer or payment it stands for."""
    w = world
    single_transfer = ledger.transfer(w.alice.id, w.a1.id, w.a2.id, 1_000, description="one")
    single_p2p = ledger.p2p_payment(w.alice.id, w.a1.id, w.b1.id, 500, note="two")
    legs = [leg(w.a1, w.a2, 2_000, text="one"), leg(w.a1, w.b1, 300, p2p=True, text="two"),
            leg(w.a2, w.a1, 700, text="one"), leg(w.a2, w.b1, 50, p2p=True, text="two")]
    postings = ledger.batch(w.alice.id, legs)
    after = ledger.transfer(w.alice.id, w.a2.id, w.a1.id, 10, description="after")

    assert [p.movement_id for p in postings] == [l.id for l in legs]
    times = [p.posted_at for p in postings]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert single_p2p.posted_at < times[0] and times[-1] < after.posted_at
    for l, p in zip(legs, postings):
        outbound, inbound = pair_of(l.id)
        # The posting is what was stored, entry for entry.
        assert (outbound.id, outbound.account_id, outbound.balance_after) == (
            p.debit.entry_id, l.from_account_id, p.debit.balance_after)
        assert (inbound.id, inbound.account_id, inbound.balance_after) == (
            p.credit.entry_id, l.to_account_id, p.credit.balance_after)
        like = pair_of(single_p2p.movement_id if l.p2p else single_transfer.movement_id)
        for entry, single in zip((outbound, inbound), like):
            assert shape(entry) == dict(shape(single), amount=l.amount)
            assert entry.reference == "E" + entry.id.hex
            assert entry.created_at == p.posted_at
            assert (entry.transfer_id, entry.p2p_id) == ((None, l.id) if l.p2p else (l.id, None))
        row = (P2PTransaction if l.p2p else Transfer).get_by_id(l.id)
        assert row.created_at == row.completed_at == p.posted_at
        assert (row.amount, row.currency, row.reference, row.status) == (
            l.amount, USD, l.reference, "completed")
    assert [Account.get_by_id(a.id).balance for a in (w.a1, w.a2, w.b1)] == [
        100_000 - 1_000 - 500 - 2_000 - 300 + 700 + 10, 1_000 + 2_000 - 700 - 50 - 10,
        500 + 300 + 50]
    assert_books_whole(w.a1, w.a2, w.b1)
    # A leg is an ordinary movement: it reverses like one.
    ledger.reverse(postings[1].debit.entry_id)
    assert P2PTransaction.get_by_id(legs[1].id).status == "reversed"
    assert_books_whole(w.a1, w.a2, w.b1)


def test_a_hundred_legs_back_and_forth_on_one_pair_leave_the_right_balances(world):
    """Each account is written once by the batch, at the balance its last leg leaves, and
    every leg's entries carry the balance after that leg; the source may touch zero."""
    w = world
    ledger.transfer(w.alice.id, w.a1.id, w.a2.id, 99_000)   # a1 holds 1,000, a2 99,000
    legs, expected = [], []
    balances = {w.a1.id: 1_000, w.a2.id: 99_000}
    for k in range(100):
        source, target = (w.a1, w.a2) if k % 2 == 0 else (w.a2, w.a1)
        amount = 1_000 if k % 2 == 0 else 1_000 + k   # a1 is emptied on every even leg
        legs.append(leg(source, target, amount))
        balances[source.id] -= amount
        balances[target.id] += amount
        expected.append((balances[source.id], balances[target.id]))
    postings = ledger.batch(w.alice.id, legs)
    assert [(p.debit.balance_after, p.credit.balance_after) for p in postings] == expected
    assert expected[0][0] == 0
    assert [Account.get_by_id(a).balance for a in balances] == list(balances.values())
    assert balances[w.a1.id] == 1_000 + sum(1_000 + k for k in range(1, 100, 2)) - 50 * 1_000
    assert (len(history(w.a1)), len(history(w.a2))) == (102, 101)
    assert_books_whole(w.a1, w.a2)


def test_a_refused_batch_names_every_leg_and_writes_nothing(world):
    w = world
    before = (Transaction.select().count(), [Account.get_by_id(a.id).balance
                                             for a in (w.a1, w.a2, w.b1)])
    with pytest.raises(errors.BatchRefused) as refused:
        ledger.batch(w.alice.id, [leg(w.a1, w.a2, 60_000), leg(w.a1, w.b1, 50_000, p2p=True),
                                  leg(w.a2, w.b1, 1)])
    assert [(f["index"], f["side"]) for f in refused.value.extra["failures"]] == [
        (1, "source"), (2, "destination")]
    assert (Transaction.select().count(), [Account.get_by_id(a.id).balance
                                           for a in (w.a1, w.a2, w.b1)]) == before


def test_a_leg_with_no_p2p_flag_is_a_transfer_and_may_not_reach_another_user(world):
    # Only raw SQL can send NULL (ledger.batch sends true or false); it must
    # not slip past the "the destination is mine" check of a transfer.
    w = world
    from hoardrun.db import db
    movement = uuid.uuid4()
    with pytest.raises(pw.OperationalError) as refused, db.atomic():
        db.execute_sql(
            "SELECT * FROM hoardrun_batch(%s, %s::uuid[], %s::boolean[], %s::uuid[], "
            "%s::uuid[], %s::bigint[], %s::text[], %s::text[])",
            (w.alice.id.hex, [movement.hex], [None], [w.a1.id.hex], [w.b1.id.hex], [100],
             [ledger.new_reference("TRF", movement)], [None]))
    assert refused.value.orig.pgcode == "HR030"
    assert json.loads(refused.value.orig.diag.message_detail) == [
        {"code": "HR404", "side": "destination", "index": 0, "message": "account not found"}]
    assert Account.get_by_id(w.b1.id).balance == 0


# ---------------------------------------------------------------------------
# Against migration 008's batch, which posted leg by leg through the writer


def _batch_008():
    """008's hoardrun_batch as a temporary function of one session (pg_temp)."""
    path = schema.MIGRATIONS_DIR / "014_batch_set_based.py"
    spec = importlib.util.spec_from_file_location("migration_014", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PREVIOUS_BATCH.replace("%%", "%").replace(
        "FUNCTION hoardrun_batch(", "FUNCTION pg_temp.hoardrun_batch_008(", 1)


CALL = ("SELECT * FROM {}(%s, %s::uuid[], %s::boolean[], %s::uuid[], %s::uuid[], "
        "%s::bigint[], %s::text[], %s::text[])")


def _outcome(cur, function, user, legs):
    """What one batch call answers and writes, minus entry ids and clock readings."""
    ids = [l[0] for l in legs]
    cur.execute("SAVEPOINT leg_batch")
    try:
        cur.execute(CALL.format(function), (user, *map(list, zip(*legs))))
        postings = cur.fetchall()
        # The commit-time rules, now: every entry's continuity, chain, currency, movement.
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
    except psycopg2.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT leg_batch")
        cur.execute("SET CONSTRAINTS ALL DEFERRED")
        return ("refused", exc.pgcode, exc.diag.message_primary, exc.diag.message_detail), None
    cur.execute("SET CONSTRAINTS ALL DEFERRED")
    cur.execute("SELECT account_id, seq, movement_id, type, direction, amount, currency, "
                "balance_after, description, merchant_name, merchant_category, card_id, "
                "transfer_id, p2p_id, reverses_id, refund_of_id, status, symbol, quantity, "
                "reference = 'E' || replace(id::text, '-', ''), created_at "
                "FROM transactions WHERE movement_id = ANY(%s::uuid[]) "
                "ORDER BY account_id, seq", (ids,))
    entries = cur.fetchall()
    cur.execute("SELECT id, user_id, from_account_id, to_account_id, amount, currency, fee, "
                "reference, description, status, reversal_id, created_at = completed_at "
                "FROM transfers WHERE id = ANY(%s::uuid[]) ORDER BY id", (ids,))
    transfers = cur.fetchall()
    cur.execute("SELECT id, sender_id, recipient_id, sender_account_id, recipient_account_id, "
                "amount, currency, note, reference, status, reversal_id, "
                "created_at = completed_at FROM p2p_transactions "
                "WHERE id = ANY(%s::uuid[]) ORDER BY id", (ids,))
    payments = cur.fetchall()
    cur.execute("SELECT id, balance, updated_at FROM accounts ORDER BY id")
    accounts = cur.fetchall()
    posted = [row[:4] + row[5:6] + row[6:7] + row[8:9] for row in postings]
    times = [row[9] for row in postings]
    stamped = {(e[2], e[4]): e[-1] for e in entries}
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(stamped[(row[0], side)] == row[9] for row in postings
               for side in ("outbound", "inbound"))
    result = ("posted", posted, [e[:-1] for e in entries], transfers, payments, accounts)
    return result, postings


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_answers_and_writes_what_008s_leg_by_leg_batch_did(world, uid, database_url,
                                                                   seed):
    """Random batches, good and bad legs mixed, through both definitions on the same books:
    the same refusal (code, message, DETAIL) or the same postings, entries, rows, balances."""
    w = world
    rng = random.Random(seed)
    a_eur, frozen = make_account(w.alice, EUR), make_account(w.alice, status="suspended")
    b_eur, carol = make_account(w.bob, EUR), make_account(make_user(uid))
    ledger.deposit(w.a2.id, 50_000)
    ledger.deposit(a_eur.id, 50_000)
    mine, theirs = [w.a1, w.a2, a_eur, frozen], [w.b1, b_eur, carol]
    settlement = ledger.settlement_account_ids(USD)[0]
    conn = psycopg2.connect(database_url)
    try:
        cur = conn.cursor()
        cur.execute(_batch_008())
        good = [(w.a1, w.a2, False), (w.a2, w.a1, False), (w.a1, w.b1, True),
                (w.a2, carol, True), (a_eur, b_eur, True)]
        posted = 0
        for round_ in range(30):
            legs = []
            for _ in range(rng.randint(1, 12)):
                source, target, p2p = rng.choice(good)
                amount = rng.randint(1, 3_000)
                if round_ % 3:  # two batches in three get bad legs too
                    p2p = rng.random() < 0.4
                    source = rng.choice(mine if rng.random() < 0.95 else theirs)
                    pool = theirs if p2p else mine
                    target = rng.choice(pool if rng.random() < 0.9 else mine + theirs)
                    amount = rng.choice([amount] * 8 + [
                        0, -1, rng.randint(20_000, 200_000), 10 ** 15 + 1])
                ids = [source.id, target.id]
                if round_ % 3 and rng.random() < 0.05:
                    ids[rng.randint(0, 1)] = rng.choice([uuid.uuid4(), settlement])
                if round_ % 3 and rng.random() < 0.05:
                    ids[1] = ids[0]
                movement = uuid.uuid4()
                legs.append((movement.hex, p2p, ids[0].hex, ids[1].hex, amount,
                             ledger.new_reference("P2P" if p2p else "TRF", movement),
                             rng.choice([None, "rent", "x" * 500])))
            old, _ = _outcome(cur, "pg_temp.hoardrun_batch_008", w.alice.id.hex, legs)
            cur.execute("ROLLBACK TO SAVEPOINT leg_batch")
            new, postings = _outcome(cur, "hoardrun_batch", w.alice.id.hex, legs)
            assert new == old, f"round {round_}: {legs}"
            posted += postings is not None
        assert posted >= 5, "too few batches posted to compare what they write"
        cur.execute("DROP FUNCTION pg_temp.hoardrun_batch_008(uuid, uuid[], boolean[], uuid[], "
                    "uuid[], bigint[], text[], text[])")
        conn.commit()
    finally:
        conn.close()
    assert_books_whole(w.a1, w.a2, a_eur, frozen, w.b1, b_eur, carol)
