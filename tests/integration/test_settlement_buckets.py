"""Cash movements spread over settlement buckets: none waits for another, the books stay exact.

Migration 009 gives a currency several settlement accounts (buckets), one
reserved per movement, so concurrent deposits, withdrawals, card payments and
trades of one currency do not queue on one row. These tests hold movements
open at the same time to prove they used different buckets, race many of
them to prove the books still balance exactly, and take 009 up and down with
money on the buckets.
"""

import random
import threading
import uuid
from collections import Counter
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import peewee as pw
import psycopg2
import pytest

from hoardrun import errors, ledger, schema
from hoardrun.db import db
from hoardrun.models import Account, Card, User
from tests.integration.test_migrations import scratch  # noqa: F401 (a fixture)

USD, EUR = "USD", "EUR"
MIGRATION = "009_settlement_buckets"
# As frozen in migration 009.
BUCKETS = 32
ADVISORY_CLASS = 72820009


def make_user(uid):
    return User.create(email=f"{uid('u')}@example.com", first_name="Ann", last_name="Lee",
                       password_hash="not-a-real-hash")


def make_account(user, currency=USD):
    return Account.create(user=user, account_number=str(uuid.uuid4().int)[:11], name="Acc",
                          type="checking", currency=currency)


def legacy_number(currency):
    """The number 002 gives a currency's settlement account ('99' and the letters' codes)."""
    return "99" + "".join(str(ord(letter)) for letter in currency)


def held_open_together(count, movement):
    """Run ``movement(i)`` in ``count`` threads whose transactions are all open at once.

    Each thread commits only when every other has made its movement, so no
    two of them can have waited on each other's row: with one settlement row
    per currency the second would block until the first committed, and the
    barrier would time out.
    """
    barrier = threading.Barrier(count, timeout=15)
    results, failures = {}, []
    lock = threading.Lock()

    def run(i):
        try:
            with db.atomic():
                posting = movement(i)
                barrier.wait()
            with lock:
                results[i] = posting
        except Exception as exc:  # recorded, then failed on the main thread
            barrier.abort()
            with lock:
                failures.append(repr(exc))
        finally:
            db.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    return [results[i] for i in range(count)]


def currency_totals():
    return {c: int(s) for c, s in db.execute_sql(
        "SELECT currency, SUM(balance) FROM accounts GROUP BY currency")}


def test_concurrent_deposits_each_take_their_own_settlement_bucket(database, uid):
    """Eight deposits in flight at once post against eight different settlement accounts."""
    user = make_user(uid)
    accounts = [make_account(user) for _ in range(8)]
    db.close()

    postings = held_open_together(8, lambda i: ledger.deposit(accounts[i].id, 100 + i))

    used = [p.debit.account_id for p in postings]
    assert len(set(used)) == 8
    assert sorted(used) == sorted(ledger.settlement_account_ids(USD))
    for posting in postings:
        bucket = Account.get_by_id(posting.debit.account_id)
        # Each bucket took exactly its one deposit: its own balance, nobody else's.
        assert bucket.balance == posting.debit.balance_after == -posting.amount
    assert ledger.verify() == []
    assert currency_totals() == {USD: 0}


def test_card_payments_refunds_and_trades_spread_over_buckets_too(database, uid):
    """Every cash movement that meets the outside world takes a bucket of its own."""
    user = make_user(uid)
    cash = [make_account(user) for _ in range(3)]
    brokerage = Account.create(user=user, account_number=str(uuid.uuid4().int)[:11],
                               name="Brokerage", type="investment", currency=USD)
    for account in cash + [brokerage]:
        ledger.deposit(account.id, 10_000)
    cards = [Card.create(user=user.id, account=a.id, type="debit", cardholder_name="Ann L",
                         number_encrypted="opaque", number_fingerprint=uuid.uuid4().hex,
                         last_four="1234", masked_number="**** **** **** 1234", expiry_month=12,
                         expiry_year=2099, daily_limit=5_000, monthly_limit=20_000)
             for a in cash]
    paid = ledger.card_payment(user.id, cards[2].id, 900, merchant_name="Shop",
                               merchant_category="5411", channel="chip")
    ledger.set_price("ACME", Decimal("1.25"), name="Acme Corp", type="stock", currency=USD)
    db.close()

    movements = [
        lambda: ledger.card_payment(user.id, cards[0].id, 100, merchant_name="Shop",
                                    merchant_category="5411", channel="chip"),
        lambda: ledger.card_payment(user.id, cards[1].id, 200, merchant_name="Shop",
                                    merchant_category="5411", channel="chip"),
        lambda: ledger.card_refund(user.id, paid.debit.entry_id, 300),
        lambda: ledger.buy(user.id, brokerage.id, "ACME", Decimal("4")).posting,
    ]
    postings = held_open_together(len(movements), lambda i: movements[i]())

    settlement = set(ledger.settlement_account_ids(USD))
    sides = [{p.debit.account_id, p.credit.account_id} & settlement for p in postings]
    assert all(len(side) == 1 for side in sides)  # one leg each meets the outside world
    assert len(set().union(*sides)) == len(movements)
    assert ledger.verify() == []
    assert currency_totals() == {USD: 0}


def test_many_racing_cash_movements_keep_every_currency_at_zero(database, uid):
    """Deposits, withdrawals and transfers from threads spread over buckets; the books stay exact."""
    users = [make_user(uid) for _ in range(4)]
    accounts = {c: [make_account(u, c) for u in users for _ in range(2)] for c in (USD, EUR)}
    for account in accounts[USD] + accounts[EUR]:
        ledger.deposit(account.id, 5_000)
    db.close()

    threads, per_thread = 8, 30
    outcomes, failures = Counter(), []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(seed):
        rng = random.Random(seed)
        local = Counter()
        try:
            start.wait()
            for _ in range(per_thread):
                account = rng.choice(accounts[rng.choice((USD, EUR))])
                amount = rng.randint(1, 4_000)
                try:
                    kind = rng.random()
                    if kind < 0.4:
                        ledger.deposit(account.id, amount)
                        local["deposit"] += 1
                    elif kind < 0.8:
                        ledger.withdraw(account.id, amount)
                        local["withdrawal"] += 1
                    else:
                        sibling = next(a for a in accounts[account.currency]
                                       if a.user_id == account.user_id and a.id != account.id)
                        ledger.transfer(account.user_id, account.id, sibling.id, amount)
                        local["transfer"] += 1
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
    assert outcomes["deposit"] and outcomes["withdrawal"] and outcomes["insufficient"]
    assert ledger.verify() == []
    assert currency_totals() == {USD: 0, EUR: 0}
    for currency in (USD, EUR):
        buckets = ledger.settlement_account_ids(currency)
        entries = dict(db.execute_sql(
            "SELECT account_id, count(*) FROM transactions WHERE account_id IN %s "
            "GROUP BY account_id", (tuple(buckets),)).fetchall())
        # Eight connections: their movements did not all land on one row.
        assert len([n for n in entries.values() if n]) > 1, entries
        customers = sum(a.balance for a in Account.select().where(
            (Account.currency == currency) & (Account.type != "settlement")))
        settlement = sum(Account.get_by_id(b).balance for b in buckets)
        assert settlement == -customers


def test_a_currencys_buckets_are_all_of_that_currency(database, uid):
    """Every bucket of USD is a USD settlement account, numbered as 009 says, and so for EUR."""
    user = make_user(uid)
    accounts = [make_account(user, USD) for _ in range(3)] + \
        [make_account(user, EUR) for _ in range(3)]
    db.close()

    postings = held_open_together(6, lambda i: ledger.deposit(accounts[i].id, 1_000))

    for currency in (USD, EUR):
        ids = ledger.settlement_account_ids(currency)
        assert len(ids) == 3
        assert {p.debit.account_id for p in postings if p.currency == currency} == set(ids)
        buckets = [Account.get_by_id(i) for i in ids]
        assert all(b.type == "settlement" and b.currency == currency and b.user_id is None
                   and b.status == "active" for b in buckets)
        numbers = {b.settlement_bucket: b.account_number for b in buckets}
        assert len(numbers) == 3 and all(0 <= k < BUCKETS for k in numbers)
        for bucket, number in numbers.items():
            assert number == legacy_number(currency) + (f"{bucket:02d}" if bucket else "")
        assert sum(b.balance for b in buckets) == -3_000
    assert not set(ledger.settlement_account_ids(USD)) & set(ledger.settlement_account_ids(EUR))
    assert ledger.settlement_account_ids("JPY") == []


def test_one_transaction_keeps_to_one_bucket(database, uid):
    """Two cash movements in one transaction post against the same settlement account."""
    user = make_user(uid)
    a1, a2 = make_account(user), make_account(user)
    with db.atomic():
        first = ledger.deposit(a1.id, 700)
        second = ledger.withdraw(a1.id, 200)
        third = ledger.deposit(a2.id, 50)
    assert first.debit.account_id == second.credit.account_id == third.debit.account_id
    assert ledger.settlement_account_ids(USD) == [first.debit.account_id]


def test_a_settlement_account_without_its_bucket_is_refused(database, uid):
    """The database keeps buckets and settlement accounts together, whatever the writer."""
    user = make_user(uid)
    with pytest.raises(pw.IntegrityError, match="accounts_settlement_bucket"):
        with db.atomic():
            Account.create(user=None, account_number="99858368", name="Settlement USD",
                           type="settlement", currency=USD)
    with pytest.raises(pw.IntegrityError, match="accounts_settlement_bucket"):
        with db.atomic():
            Account.create(user=user, account_number="12345678901", name="Acc",
                           type="checking", currency=USD, settlement_bucket=3)


# ---------------------------------------------------------------------------
# 009 up and down with money on the buckets
# ---------------------------------------------------------------------------


def _key(currency, bucket):
    base = (ord(currency[0]) - 65) * 676 + (ord(currency[1]) - 65) * 26 + ord(currency[2]) - 65
    return base * 100 + bucket


@pytest.fixture
def books(scratch, settings):  # noqa: F811 (the imported fixture)
    """A scratch database migrated up to just before 009, with one funded USD account."""
    database = scratch("buckets")
    parts = urlsplit(settings.database_url)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path + "_buckets", parts.query, ""))
    names = schema.all_migrations()
    schema.migrate(database, target=names[names.index(MIGRATION) - 1])
    connections = []

    def session():
        conn = psycopg2.connect(url)
        conn.autocommit = True
        connections.append(conn)
        return conn.cursor()

    cur = session()
    user, account = uuid.uuid4(), uuid.uuid4()
    cur.execute("INSERT INTO users (id, email, first_name, last_name, password_hash) "
                "VALUES (%s, 'ann@example.com', 'Ann', 'Lee', 'x')", (user.hex,))
    cur.execute("INSERT INTO accounts (id, user_id, account_number, name, type, currency) "
                "VALUES (%s, %s, '12345678901', 'Acc', 'checking', 'USD')",
                (account.hex, user.hex))
    w = type("Books", (), {})()
    w.database, w.session, w.account = database, session, account
    yield w
    for conn in connections:
        conn.close()


def _deposit_on_bucket(books, bucket, amount):
    """Deposit ``amount`` through the ledger so that it lands on ``bucket``.

    Another session reserves every other bucket first (the reservations the
    ledger itself takes), so the deposit's own pick can only be ``bucket``.
    """
    holder, depositor = books.session(), books.session()
    for other in range(BUCKETS):
        if other != bucket:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_CLASS, _key(USD, other)))
    try:
        depositor.execute("SELECT (hoardrun_cash(gen_random_uuid(), NULL, %s, %s, 'USD', true, "
                          "'deposit')).debit_account", (books.account.hex, amount))
        return depositor.fetchone()[0]
    finally:
        holder.execute("SELECT pg_advisory_unlock_all()")


def _settlement_rows(books):
    cur = books.session()
    cur.execute("SELECT a.id, a.account_number, a.name, a.balance, count(t.id) FROM accounts a "
                "LEFT JOIN transactions t ON t.account_id = a.id WHERE a.type = 'settlement' "
                "GROUP BY a.id ORDER BY a.account_number")
    return cur.fetchall()


def _sums_to_zero(books):
    cur = books.session()
    cur.execute("SELECT SUM(balance) FROM accounts WHERE currency = 'USD'")
    return cur.fetchone()[0] == 0


def test_009_keeps_the_settlement_account_and_merges_back_unused_buckets(books):
    """Up: the old account is bucket 0. Down: empty buckets go, the old account stays whole."""
    cur = books.session()
    cur.execute("SELECT (hoardrun_cash(gen_random_uuid(), NULL, %s, 500, 'USD', true, 'old'))"
                ".debit_account", (books.account.hex,))
    (old_id,) = cur.fetchone()
    before = _settlement_rows(books)
    assert [r[1:] for r in before] == [(legacy_number(USD), "Settlement USD", -500, 1)]

    assert schema.migrate(books.database, target=MIGRATION) == [MIGRATION]
    cur.execute("SELECT settlement_bucket FROM accounts WHERE id = %s", (old_id,))
    assert cur.fetchone()[0] == 0
    assert _deposit_on_bucket(books, 0, 250) == old_id
    # A bucket created by a movement elsewhere, holding nothing yet.
    holder = books.session()
    for other in range(1, BUCKETS):
        if other != 7:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_CLASS, _key(USD, other)))
    holder.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_CLASS, _key(USD, 0)))
    cur.execute("SELECT hoardrun_settlement_account('USD')")
    holder.execute("SELECT pg_advisory_unlock_all()")
    assert len(_settlement_rows(books)) == 2

    assert schema.rollback(books.database, 1) == [MIGRATION]
    assert _settlement_rows(books) == [
        (old_id, legacy_number(USD), "Settlement USD", -750, 2)]
    assert _sums_to_zero(books)
    # 002's function again: the one account, nothing else.
    cur.execute("SELECT hoardrun_settlement_account('USD')")
    assert cur.fetchone()[0] == old_id


def test_009_rollback_gives_the_kept_bucket_the_old_number(books):
    """With its only entries on bucket 5, the rollback keeps bucket 5 as the one account."""
    assert schema.migrate(books.database, target=MIGRATION) == [MIGRATION]
    used = _deposit_on_bucket(books, 5, 300)
    assert [r[1:] for r in _settlement_rows(books)] == [
        (legacy_number(USD) + "05", "Settlement USD #5", -300, 1)]

    assert schema.rollback(books.database, 1) == [MIGRATION]
    assert _settlement_rows(books) == [(used, legacy_number(USD), "Settlement USD", -300, 1)]
    assert _sums_to_zero(books)


def test_009_rollback_refuses_when_entries_would_have_to_move(books):
    """Entries on two buckets cannot be merged without rewriting them: refused, nothing changed."""
    assert schema.migrate(books.database, target=MIGRATION) == [MIGRATION]
    _deposit_on_bucket(books, 0, 100)
    _deposit_on_bucket(books, 9, 200)
    before = _settlement_rows(books)
    assert len(before) == 2

    with pytest.raises(pw.DatabaseError, match="USD has entries on 2 settlement buckets"):
        schema.rollback(books.database, 1)
    assert schema.applied_migrations(books.database)[-1] == MIGRATION
    assert _settlement_rows(books) == before
    assert _sums_to_zero(books)
