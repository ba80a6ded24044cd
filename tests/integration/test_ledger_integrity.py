"""The database refuses a wrong book, and history is tamper-evident (migration 010).

Every attack below is raw SQL sent with the application's own credentials
(a role made by ``roles.grant_app_role``, exactly what ``invoke db.init
--app-role`` grants in production), in one transaction; each is refused with
the error that names the rule it breaks, and the books are untouched after.
"""

import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from hoardrun import chain, ledger, roles
from hoardrun.db import db
from hoardrun.models import Account, Card, User
from tests.conftest import base_environ

ROOT = Path(__file__).resolve().parents[2]


def role_url(url, role, password):
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{role}:{password}@{host}", parts.path, parts.query, ""))


@pytest.fixture
def app_role(database, database_url):
    """A login role with the production grants on this test's database; its URL."""
    # Roles are per cluster: one name per test database, so parallel runs never share one.
    dbname = urlsplit(database_url).path.lstrip("/")
    name = re.sub(r"[^a-z0-9_]", "_", dbname.lower())[:50] + "_app"
    password = secrets.token_urlsafe(16)
    roles.grant_app_role(database, name, password=password)
    yield role_url(database_url, name, password)
    database.execute_sql(f'DROP OWNED BY "{name}"')
    database.execute_sql(f'DROP ROLE "{name}"')


class Book:
    """Alice (a1, a2 in USD, e1 in EUR) and Bob (b1), with money moved by the ledger."""

    def __init__(self):
        self.alice = User.create(email=f"alice-{uuid.uuid4().hex[:8]}@example.com",
                                 first_name="Alice", last_name="Lee", password_hash="x")
        self.bob = User.create(email=f"bob-{uuid.uuid4().hex[:8]}@example.com",
                               first_name="Bob", last_name="Ray", password_hash="x")
        self.a1 = self._account(self.alice, "USD", primary=True)
        self.a2 = self._account(self.alice, "USD", type="savings")
        self.e1 = self._account(self.alice, "EUR", type="savings")
        self.b1 = self._account(self.bob, "USD", primary=True)
        ledger.deposit(self.a1, 100_000)
        ledger.deposit(self.e1, 50_000)
        self.transfer = ledger.transfer(self.alice.id, self.a1, self.a2, 3_000)
        self.reversed = ledger.transfer(self.alice.id, self.a1, self.a2, 2_000)
        ledger.reverse(self.reversed.debit.entry_id)
        card = Card.create(user=self.alice.id, account=self.a1, type="debit",
                           cardholder_name="ALICE LEE", number_encrypted="x",
                           number_fingerprint=uuid.uuid4().hex * 2, last_four="4242",
                           masked_number="**** **** **** 4242", expiry_month=12,
                           expiry_year=2099, daily_limit=10 ** 9, monthly_limit=10 ** 9)
        self.payment = ledger.card_payment(self.alice.id, card.id, 5_000, merchant_name="Shop",
                                           merchant_category="5411", channel="online")
        ledger.card_refund(self.alice.id, self.payment.debit.entry_id, 4_000)
        self.settlement = self.payment.credit.account_id  # one of USD's settlement buckets
        db.execute_sql("INSERT INTO audit_log (id, action, entity_type) "
                       "VALUES (gen_random_uuid(), 'test', 'account')")

    @staticmethod
    def _account(user, currency, primary=False, type="checking"):
        return Account.create(user=user.id, account_number=str(uuid.uuid4().int)[:12],
                              name=type.title(), type=type, currency=currency,
                              is_primary=primary).id


@pytest.fixture
def book(database):
    return Book()


class Forger:
    """Raw SQL as the app role: entries that look like the ledger's own, but for one flaw."""

    def __init__(self, cur):
        self.cur = cur

    def latest(self, account):
        self.cur.execute("SELECT seq, balance_after, chain_hash FROM transactions "
                         "WHERE account_id = %s ORDER BY seq DESC LIMIT 1", (str(account),))
        return self.cur.fetchone() or (0, 0, None)

    def entry(self, account, movement, direction, amount, *, currency="USD", type="deposit",
              reverses=None, refund_of=None, seq_shift=1, balance_shift=0, bad_hash=False,
              move_balance=True):
        """Append one entry to ``account``'s chain (and move its balance), flawed as asked."""
        seq, balance, previous = self.latest(account)
        seq += seq_shift
        balance += (amount if direction == "inbound" else -amount) + balance_shift
        entry_id = str(uuid.uuid4())
        values = dict(id=entry_id, account_id=str(account), movement_id=str(movement),
                      type=type, direction=direction, amount=amount, currency=currency,
                      balance_after=balance, reverses_id=reverses and str(reverses),
                      refund_of_id=refund_of and str(refund_of),
                      reference="E" + uuid.uuid4().hex, seq=seq)
        self.cur.execute(
            "SELECT hoardrun_entry_hash(%(prev)s, %(id)s, %(account_id)s, %(seq)s, "
            "%(movement_id)s, %(type)s, %(direction)s, %(amount)s, %(currency)s, "
            "%(balance_after)s, NULL, NULL, NULL, NULL, NULL, NULL, %(reverses_id)s, "
            "%(refund_of_id)s, %(reference)s, 'completed', %(at)s, NULL, NULL)",
            dict(values, prev=previous, at="2030-01-01T00:00:00Z"))
        digest = self.cur.fetchone()[0]
        values.update(chain_hash=bytes(32) if bad_hash else digest,
                      created_at="2030-01-01T00:00:00Z")
        columns = ", ".join(values)
        self.cur.execute(f"INSERT INTO transactions ({columns}) VALUES "
                         f"({', '.join('%(' + c + ')s' for c in values)})", values)
        if move_balance:
            self.cur.execute("UPDATE accounts SET balance = %s WHERE id = %s",
                             (balance, str(account)))
        return entry_id

    def pair(self, debit, credit, amount, *, debit_kw=None, credit_kw=None, **common):
        movement = uuid.uuid4()
        for account, direction, extra in ((debit, "outbound", debit_kw),
                                          (credit, "inbound", credit_kw)):
            kw = {"amount": amount, **common, **(extra or {})}
            self.entry(account, movement, direction, kw.pop("amount"), **kw)
        return movement


def _entry_of(posting, side):
    return str(getattr(posting, side).entry_id)


# Each attack: (id, what the rule is called in the error, the SQL as a function of (forger, book)).
ATTACKS = [
    ("unbalanced-insert", "ledger_movement_balanced",
     lambda f, b: f.entry(b.a1, uuid.uuid4(), "inbound", 1_000)),
    ("unbalanced-pair", "ledger_movement_balanced",
     lambda f, b: f.pair(b.a1, b.a2, 100, credit_kw={"amount": 101})),
    ("balanced-across-currencies", "ledger_movement_balanced",
     lambda f, b: f.pair(b.a1, b.e1, 100, credit_kw={"currency": "EUR"})),
    ("currency-mismatch", "ledger_entry_currency",
     lambda f, b: f.pair(b.a1, b.a2, 100, currency="EUR")),
    ("account-currency-edit", "ledger_entry_currency",
     lambda f, b: f.cur.execute("UPDATE accounts SET currency = 'EUR' WHERE id = %s",
                                (str(b.a2),))),
    ("balance-edit", "ledger_balance_stored",
     lambda f, b: f.cur.execute("UPDATE accounts SET balance = balance + 100 WHERE id = %s",
                                (str(b.a1),))),
    ("new-account-with-money", "ledger_balance_stored",
     lambda f, b: f.cur.execute(
         "INSERT INTO accounts (id, user_id, account_number, name, type, currency, balance) "
         "VALUES (gen_random_uuid(), %s, %s, 'Free money', 'savings', 'USD', 1000000)",
         (str(b.bob.id), str(uuid.uuid4().int)[:12]))),
    ("entries-without-balances", "ledger_balance_stored",
     lambda f, b: f.pair(b.a1, b.a2, 100, move_balance=False)),
    ("wrong-balance-after", "ledger_balance_continuity",
     lambda f, b: f.pair(b.a1, b.a2, 100, credit_kw={"balance_shift": 100},
                         debit_kw={"balance_shift": -100})),
    ("gap-in-history", "ledger_balance_continuity",
     lambda f, b: f.pair(b.a1, b.a2, 100, seq_shift=2)),
    ("forked-history", "transactions_account_id_seq",
     lambda f, b: f.pair(b.a1, b.a2, 100, seq_shift=0)),
    ("forged-hash", "ledger_chain_hash",
     lambda f, b: f.pair(b.a1, b.a2, 100, credit_kw={"bad_hash": True})),
    ("edited-amount", "permission denied for table transactions",
     lambda f, b: f.cur.execute("UPDATE transactions SET amount = 1 WHERE id = %s",
                                (_entry_of(b.transfer, "debit"),))),
    ("deleted-leg", "permission denied for table transactions",
     lambda f, b: f.cur.execute("DELETE FROM transactions WHERE id = %s",
                                (_entry_of(b.transfer, "credit"),))),
    ("truncated-history", "permission denied for table transactions",
     lambda f, b: f.cur.execute("TRUNCATE transactions CASCADE")),
    ("edited-audit-row", "permission denied for table audit_log",
     lambda f, b: f.cur.execute("UPDATE audit_log SET action = 'nothing'")),
    ("deleted-audit-row", "permission denied for table audit_log",
     lambda f, b: f.cur.execute("DELETE FROM audit_log")),
    ("duplicated-reversal", "transactions_reverses_id",
     lambda f, b: f.pair(b.a1, b.a2, 2_000,
                         credit_kw={"reverses": _entry_of(b.reversed, "credit"), "type": "reversal"},
                         debit_kw={"type": "reversal"})),
    ("reversal-through-the-other-leg", "ledger_single_reversal",
     lambda f, b: (f.pair(b.a2, b.a1, 1_500, type="reversal",
                          debit_kw={"reverses": _entry_of(b.transfer, "credit")}),
                   f.pair(b.a2, b.a1, 1_500, type="reversal",
                          credit_kw={"reverses": _entry_of(b.transfer, "debit")}))),
    ("reversal-of-a-reversal", "ledger_single_reversal",
     lambda f, b: f.pair(b.a1, b.a2, 2_000, type="reversal", debit_kw={"reverses": _reversal_leg(
         f, b)})),
    ("reversal-on-another-account", "ledger_single_reversal",
     lambda f, b: f.pair(b.settlement, b.b1, 3_000, type="reversal",
                         credit_kw={"reverses": _entry_of(b.transfer, "debit")})),
    ("refund-past-the-payment", "ledger_refund_limit",
     lambda f, b: f.pair(b.settlement, b.a1, 1_001, type="refund",
                         debit_kw={"type": "settlement"},
                         credit_kw={"refund_of": _entry_of(b.payment, "debit")})),
    ("disable-the-rules", "must be owner of table transactions",
     lambda f, b: f.cur.execute(
         "ALTER TABLE transactions DISABLE TRIGGER transactions_ledger_rules")),
    ("triggers-off-for-the-session", "permission denied to set parameter",
     lambda f, b: f.cur.execute("SET session_replication_role = replica")),
    ("replace-a-rule", "permission denied for schema public",
     lambda f, b: f.cur.execute(
         "CREATE OR REPLACE FUNCTION hoardrun_check_account() RETURNS trigger "
         "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")),
]


def _reversal_leg(forger, book):
    """The inbound reversing entry (on a1) of ``book.reversed``."""
    forger.cur.execute("SELECT id FROM transactions WHERE reverses_id = %s",
                       (_entry_of(book.reversed, "debit"),))
    return str(forger.cur.fetchone()[0])


def _books():
    return (sorted(db.execute_sql("SELECT id, balance, currency FROM accounts").fetchall()),
            db.execute_sql("SELECT count(*) FROM transactions").fetchone()[0],
            db.execute_sql("SELECT count(*) FROM audit_log").fetchone()[0])


@pytest.mark.parametrize("rule, attack", [pytest.param(r, a, id=i) for i, r, a in ATTACKS])
def test_raw_sql_attack_as_the_app_role_is_refused(book, app_role, rule, attack):
    """Sent with the app's credentials and committed, the attack fails naming its rule."""
    before = _books()
    conn = psycopg2.connect(app_role)
    try:
        with pytest.raises(psycopg2.Error) as refused:
            with conn.cursor() as cur:
                attack(Forger(cur), book)
            conn.commit()  # the deferred rules speak here
        conn.rollback()
    finally:
        conn.close()
    assert rule in str(refused.value), str(refused.value)
    assert _books() == before
    assert ledger.verify() == [] and chain.verify_chain() == []


def test_there_are_at_least_fifteen_attacks():
    assert len(ATTACKS) >= 15 and len({a[0] for a in ATTACKS}) == len(ATTACKS)


def test_the_app_role_runs_the_ledger_and_an_honest_forgery_passes(book, app_role):
    """The grants suffice for every movement; the forger itself is right when it means to be."""
    conn = psycopg2.connect(app_role)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT hoardrun_transfer(gen_random_uuid(), %s, %s, %s, 500, 'USD', "
                        "%s, 'as the app')", (str(book.alice.id), str(book.a1), str(book.a2),
                                             "TRF-" + uuid.uuid4().hex))
            cur.execute("SELECT hoardrun_cash(gen_random_uuid(), NULL, %s, 700, 'USD', false, "
                        "'cash')", (str(book.a2),))
            conn.commit()
            # Proves the attacks above fail for their flaw only: unflawed, the same SQL commits.
            Forger(cur).pair(book.a1, book.a2, 100)
            conn.commit()
    finally:
        conn.close()
    assert ledger.verify() == [] and chain.verify_chain() == []


def test_existing_entries_are_chained_by_the_migration(book):
    """Every entry has its place and a hash that verifies; the heads are the latest entries."""
    assert chain.verify_chain() == []
    heads = chain.chain_heads()
    seq, head = heads[book.a1]
    assert seq == db.execute_sql("SELECT count(*) FROM transactions WHERE account_id = %s",
                                 (book.a1.hex,)).fetchone()[0]
    assert len(bytes.fromhex(head)) == 32


def _superuser_edit(statement, params=()):
    """What only a superuser can do now: change history with every trigger off."""
    with db.atomic():
        db.execute_sql("SET LOCAL session_replication_role = replica")
        db.execute_sql(statement, params)


@pytest.mark.parametrize("statement, broken", [
    pytest.param("UPDATE transactions SET amount = amount + 1 WHERE id = %s", "debit",
                 id="amount"),
    pytest.param("UPDATE transactions SET description = 'nothing to see' WHERE id = %s",
                 "debit", id="description"),
    pytest.param("UPDATE transactions SET created_at = created_at - interval '1 day' "
                 "WHERE id = %s", "debit", id="date"),
    pytest.param("UPDATE transactions SET chain_hash = sha256(chain_hash) WHERE id = %s",
                 "debit", id="hash"),
])
def test_verify_chain_names_the_entry_a_superuser_edited(book, statement, broken):
    entry = getattr(book.transfer, broken).entry_id
    _superuser_edit(statement, (entry.hex,))
    problems = chain.verify_chain()
    assert len(problems) == 1 and str(entry) in problems[0], problems
    assert "content" in problems[0]


def test_verify_chain_names_the_entry_after_a_deleted_one_and_a_reordering(book):
    first = book.transfer.debit.entry_id
    after = db.execute_sql(
        "SELECT n.id FROM transactions e JOIN transactions n ON n.account_id = e.account_id "
        "AND n.seq = e.seq + 1 WHERE e.id = %s", (first.hex,)).fetchone()[0]
    _superuser_edit("DELETE FROM transactions WHERE id = %s", (first.hex,))
    problems = chain.verify_chain()
    assert any(str(after) in p and "removed or the order was changed" in p for p in problems), \
        problems


def test_verify_chain_task_reports_a_superuser_edit_and_exits_1(book, database_url, tmp_path):
    """``invoke db.verify --chain`` names the edited entry; without drift it passes."""
    env = {**base_environ(database_url), "PATH": "/usr/bin:/bin"}

    def verify():
        return subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), "db.verify",
                               "--chain"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    clean = verify()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "hash chain is intact" in clean.stdout
    entry = book.payment.debit.entry_id
    _superuser_edit("UPDATE transactions SET merchant_name = 'Elsewhere' WHERE id = %s",
                    (entry.hex,))
    tampered = verify()
    assert tampered.returncode == 1
    assert f"hash chain broken at entry {entry}" in tampered.stdout
    assert tampered.stderr.strip().splitlines()[-1] == "ledger drift: 1 problem(s) found"


def test_init_creates_the_app_role_with_exactly_its_grants(book, database, app_role):
    """No UPDATE, DELETE or TRUNCATE on history for the app; the rest of the app works."""
    role = urlsplit(app_role).username
    granted = {(t, p) for t, p in database.execute_sql(
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
        "WHERE grantee = %s", (role,))}
    for table in ("transactions", "audit_log"):
        assert {p for t, p in granted if t == table} == {"SELECT", "INSERT"}
    assert {p for t, p in granted if t == "accounts"} == {"SELECT", "INSERT", "UPDATE", "DELETE"}
    assert not any(p in ("TRUNCATE", "TRIGGER", "REFERENCES") for _, p in granted)
    assert database.execute_sql("SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls "
                                "FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (False,)
