"""``get_account`` and ``list_accounts`` read what the peewee select they replace read.

They run SQL text built once from the model (compiling the select on every
request cost more CPU than running it); these tests compare their accounts,
field by field and type by type, with what ``Account.select(Account,
fn.hoardrun_held(...))`` returns for the same rows at the same ``now``.
"""

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import peewee as pw
import pytest

from hoardrun import accounts, errors, ledger
from hoardrun import db as dbm
from hoardrun.models import SETTLEMENT, Account, Card, User

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
HOLD = 2_500


def _peewee_select(now):
    """The query ``accounts`` used to compile on every call."""
    return Account.select(Account,
                          pw.fn.hoardrun_held(Account.id, now).coerce(False).alias("held"))


def _read(account):
    """Everything a caller can see of ``account``: each value with its type, and ``held``."""
    fields = {name: (type(value), value) for name, value in account.__data__.items()}
    return fields, (type(account.held), account.held), set(account._dirty)


def _user(uid):
    return User.create(email=f"{uid()}@example.com", first_name="Ada", last_name="Lovelace",
                       password_hash="not-a-real-hash")


@pytest.fixture
def owner(database, uid):
    """A user with a held-on checking account, a primary savings one and a closed one."""
    user = _user(uid)
    checking = accounts.open_account(user.id, "checking", "USD", "Everyday")
    ledger.deposit(checking.id, 100_000)
    card = Card.create(user=user.id, account=checking.id, type="debit", cardholder_name="Ada L",
                       number_encrypted="opaque", number_fingerprint=uuid.uuid4().hex,
                       last_four="1234", masked_number="**** **** **** 1234", expiry_month=12,
                       expiry_year=2099, daily_limit=50_000, monthly_limit=200_000)
    ledger.authorize(user.id, card.id, HOLD, merchant_name="Hotel", merchant_category="7011",
                     channel="chip", expires_in=timedelta(days=1), now=NOW)
    savings = accounts.open_account(user.id, "savings", "USD", "Rainy day", is_primary=True)
    (Account
     .update(interest_rate=Decimal("1.2500"), overdraft_limit=5_000)
     .where(Account.id == savings.id)
     .execute())
    closed = accounts.open_account(user.id, "business", "EUR", "Old shop")
    accounts.close(user.id, closed.id)
    return user, [checking.id, savings.id, closed.id]


@pytest.mark.parametrize("now", [NOW, NOW + timedelta(days=2)], ids=["hold-active", "hold-expired"])
def test_list_accounts_reads_what_the_peewee_select_reads(owner, now):
    user, ids = owner
    expected = list(_peewee_select(now)
                    .where(Account.user == user.id)
                    .order_by(Account.created_at, Account.id))
    listed = accounts.list_accounts(user.id, now=now)
    assert [a.id for a in listed] == ids
    assert [_read(a) for a in listed] == [_read(a) for a in expected]


@pytest.mark.parametrize("now", [NOW, NOW + timedelta(days=2)], ids=["hold-active", "hold-expired"])
def test_get_account_reads_what_the_peewee_select_reads(owner, now):
    user, ids = owner
    for account_id in ids:
        expected = _peewee_select(now).where(Account.id == account_id).get()
        assert _read(accounts.get_account(user.id, account_id, now=now)) == _read(expected)


def test_the_fixture_covers_holds_closed_accounts_and_every_column(owner):
    """The comparisons above would miss nothing: every column read, and values that differ."""
    user, (checking, savings, closed) = owner
    read = {a.id: a for a in accounts.list_accounts(user.id, now=NOW)}
    assert read[checking].held == HOLD
    assert accounts.get_account(user.id, checking, now=NOW + timedelta(days=2)).held == 0
    assert read[savings].is_primary and read[savings].interest_rate == Decimal("1.2500")
    assert read[closed].status == "closed" and read[closed].closed_at.tzinfo == timezone.utc
    columns = {field.name for field in Account._meta.sorted_fields}
    assert all(set(a.__data__) == columns for a in read.values())


def test_get_account_refuses_other_users_settlement_and_missing_accounts(owner, uid):
    user, ids = owner
    stranger = _user(uid)
    settlement = Account.select(Account.id).where(Account.type == SETTLEMENT).first()
    assert settlement is not None
    for who, account_id in ((stranger.id, ids[0]), (user.id, settlement.id),
                            (user.id, uuid.uuid4())):
        with pytest.raises(errors.NotFound):
            accounts.get_account(who, account_id, now=NOW)
    assert accounts.list_accounts(stranger.id, now=NOW) == []


def test_the_list_is_one_statement(owner, monkeypatch):
    """``held`` is computed in the same statement: no query per account."""
    user, ids = owner
    sent = []
    original = dbm.PostgresDatabase.execute_sql

    def recording(self, sql, *args, **kwargs):
        sent.append(sql)
        return original(self, sql, *args, **kwargs)

    monkeypatch.setattr(dbm.PostgresDatabase, "execute_sql", recording)
    assert len(accounts.list_accounts(user.id, now=NOW)) == len(ids)
    assert len(sent) == 1
