"""Deferred writes and piggybacked transaction control keep their meaning.

BEGIN, savepoints and ``execute_deferred`` writes travel with the next
statement or the COMMIT; these tests pin that the observable behaviour is
the same as sending them one by one, and count the round trips of the
money path.
"""

import uuid

import peewee as pw
import pytest

from hoardrun import db as dbm
from hoardrun.db import db, execute_deferred
from hoardrun.models import AuditLog, User


def _user_sql():
    return ("INSERT INTO users (id, email, first_name, last_name, password_hash) "
            "VALUES (%s, %s, 'Deferred', 'Write', 'x')")


def test_a_deferred_write_lands_with_the_commit(database, uid):
    email = f"{uid()}@example.com"
    with db.atomic():
        execute_deferred(_user_sql(), (uuid.uuid4().hex, email))
    assert User.select().where(User.email == email).count() == 1


def test_a_deferred_write_dies_with_a_rollback(database, uid):
    email = f"{uid()}@example.com"
    with pytest.raises(RuntimeError):
        with db.atomic():
            execute_deferred(_user_sql(), (uuid.uuid4().hex, email))
            raise RuntimeError("changed my mind")
    assert User.select().where(User.email == email).count() == 0


def test_percent_signs_in_deferred_data_survive(database, uid):
    email = f"50%off-{uid()}@example.com"
    with db.atomic():
        execute_deferred(_user_sql(), (uuid.uuid4().hex, email))
        # A later statement with parameters carries the queued text along.
        assert User.select().where(User.email == "nobody@example.com").count() == 0
    assert User.get(User.email == email).email == email


def test_a_failing_deferred_write_fails_the_whole_transaction(database, uid):
    email = f"{uid()}@example.com"
    with pytest.raises(pw.IntegrityError):
        with db.atomic():
            User.create(email=email, first_name="First", last_name="One", password_hash="x")
            # Same email again: the UNIQUE violation surfaces at the COMMIT at the latest.
            execute_deferred(_user_sql(), (uuid.uuid4().hex, email))
    assert User.select().where(User.email == email).count() == 0


def test_savepoints_still_undo_only_their_part(database, uid):
    kept, undone = f"{uid()}@example.com", f"{uid()}@example.com"
    with db.atomic():
        User.create(email=kept, first_name="Kept", last_name="K", password_hash="x")
        with pytest.raises(pw.IntegrityError):
            with db.atomic():
                User.create(email=undone, first_name="Undone", last_name="U",
                            password_hash="x")
                User.create(email=kept, first_name="Dup", last_name="D", password_hash="x")
    assert {u.email for u in User.select()} == {kept}


@pytest.fixture
def sent(database, monkeypatch):
    """Every statement string sent to PostgreSQL, one per round trip."""
    log = []
    original = dbm.PostgresDatabase.cursor

    class Recording:
        def __init__(self, cursor):
            self._cursor = cursor

        def execute(self, sql, params=None):
            log.append(sql)
            return self._cursor.execute(sql, params)

        def __getattr__(self, name):
            return getattr(self._cursor, name)

    monkeypatch.setattr(dbm.PostgresDatabase, "cursor",
                        lambda self, *a, **k: Recording(original(self, *a, **k)))
    return log


def test_an_empty_transaction_costs_no_round_trip(sent):
    with db.atomic():
        with db.atomic():
            pass
    assert sent == []


def test_begin_savepoint_and_audit_ride_along(sent):
    with db.atomic():
        with db.atomic():
            User.select().count()
        from hoardrun import audit
        audit.record("test.ride", "test")
    assert len(sent) == 2
    assert sent[0].startswith("BEGIN; SET LOCAL") and "; SAVEPOINT" in sent[0]
    assert "INSERT INTO audit_log" in sent[1] and sent[1].endswith("COMMIT")
    assert AuditLog.select().where(AuditLog.action == "test.ride").count() == 1


def test_a_keyed_transfer_costs_three_round_trips(client, make_user, sent):
    """Token; the ledger call; audit + key with its response + COMMIT together.

    (The deposit has already read the source account's currency, which never changes.)
    """
    import money_helpers as mh

    person = make_user()
    src = mh.open_account(client, person, name="Source")["id"]
    dst = mh.open_account(client, person, name="Target")["id"]
    mh.deposit(client, person, src, "100.00")
    for _ in range(2):
        sent.clear()
        result = mh.post_money(client, person, "/transfers",
                               {"from_account_id": src, "to_account_id": dst, "amount": "1.00"},
                               key=uuid.uuid4().hex)
        assert result.status_code == 201, result.text
        assert len(sent) == 3, sent
    assert sent[1].startswith("BEGIN; SET LOCAL statement_timeout")
    assert "SELECT * FROM hoardrun_transfer" in sent[1]
    assert sent[2].endswith("COMMIT")
    assert "INSERT INTO audit_log" in sent[2] and "INSERT INTO idempotency_keys" in sent[2]


def test_a_keyed_deposit_costs_three_round_trips_like_a_transfer(client, make_user, sent):
    """Token; the ledger call; audit + key + COMMIT: no read-back of the entry just written."""
    import money_helpers as mh

    person = make_user()
    account = mh.open_account(client, person)["id"]
    mh.deposit(client, person, account, "1.00")  # reads (and keeps) the account's currency
    for path in ("deposits", "withdrawals"):
        sent.clear()
        result = mh.post_money(client, person, f"/accounts/{account}/{path}",
                               {"amount": "0.50"}, key=uuid.uuid4().hex)
        assert result.status_code == 201, result.text
        assert len(sent) == 3, sent
        assert sent[1].startswith("BEGIN; SET LOCAL") and "SELECT * FROM hoardrun_cash" in sent[1]
        assert "INSERT INTO idempotency_keys" in sent[2] and sent[2].endswith("COMMIT")


@pytest.fixture
def one_second_timeout(environ):
    """The database with DATABASE_COMMAND_TIMEOUT=1, bound to ``db``."""
    from hoardrun.config import load_settings

    database = dbm.init_db(load_settings({**environ, "DATABASE_COMMAND_TIMEOUT": "1"}))
    yield database
    database.close_all()


def test_every_transaction_carries_utc_and_the_statement_timeout(one_second_timeout):
    """Per transaction, not per session: a transaction-mode pooler keeps no session of ours."""
    def show():
        return (db.execute_sql("SHOW timezone").fetchone()[0],
                db.execute_sql("SHOW statement_timeout").fetchone()[0])

    assert show() == ("UTC", "1s")  # each statement on its own
    with db.atomic():
        assert show() == ("UTC", "1s")
    with pytest.raises(pw.OperationalError, match="statement timeout"):
        db.execute_sql("SELECT pg_sleep(3)")
    with pytest.raises(pw.OperationalError, match="statement timeout"):
        with db.atomic():
            db.execute_sql("SELECT pg_sleep(3)")
    # The session itself was never changed: a bare statement (no settings in
    # front) sees the server's own statement_timeout, not ours.
    with db.connection().cursor() as cur:
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone()[0] != "1s"
