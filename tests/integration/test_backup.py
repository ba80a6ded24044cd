"""Backups are proven to restore: a database with real history comes back identical.

The source is built through the API (users, accounts, deposits, a transfer, a
P2P payment, a card and a card payment, an investment holding, and the audit
rows all of that writes); its backup is restored into a new database and
every table must have the same row count and the same content digest (md5 of
every row's text, ordered by primary key). Restores refuse non-empty targets
(always in production), refuse damaged files before touching anything, apply
pending migrations and verify the ledger.
"""

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from money_helpers import deposit, ok, open_account, pay, transfer

from tests.conftest import base_environ, ensure_pg_database, pg_url
from hoardrun import backup, investments, schema
from hoardrun import db as dbm
from hoardrun.config import load_settings
from hoardrun.errors import BackupError

ROOT = Path(__file__).resolve().parents[2]
API = "/api/v1"


def _url_for(name):
    parts = urlsplit(pg_url())
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _admin():
    conn = psycopg2.connect(_url_for("postgres"))
    conn.autocommit = True
    return conn


@pytest.fixture
def scratch():
    """``scratch()`` -> URL of a new empty database ``<test db>_bk_<hex>``, dropped after."""
    made = []

    def make():
        name = f"{urlsplit(pg_url()).path.lstrip('/')}_bk_{uuid.uuid4().hex[:8]}"
        url = _url_for(name)
        ensure_pg_database(url)
        made.append(name)
        return url

    yield make
    conn = _admin()
    try:
        with conn.cursor() as cur:
            for name in made:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s", (name,))
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


@contextlib.contextmanager
def bound(url, **env):
    """Bind ``hoardrun.db.db`` to ``url`` meanwhile; yield its settings."""
    previous = dbm.db.obj
    settings = load_settings(base_environ(url, **env))
    database = dbm.init_db(settings)
    try:
        yield settings
    finally:
        database.close_all()
        if previous is not None:
            dbm.db.initialize(previous)


def digests(url):
    """``{table: (row count, md5 of every row's text ordered by primary key)}``."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = sorted(t for (t,) in cur.fetchall())
            result = {}
            for table in tables:
                cur.execute("""
                    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
                    FROM pg_index i
                    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                    WHERE i.indrelid = %s::regclass AND i.indisprimary""", (f'"{table}"',))
                order = cur.fetchone()[0]
                assert order, f"{table} has no primary key"
                cur.execute(f'SELECT count(*), md5(coalesce(string_agg(t::text, E\'\\n\' '
                            f'ORDER BY {order}), \'\')) FROM "{table}" t')
                result[table] = cur.fetchone()
            return result
    finally:
        conn.close()


@pytest.fixture
def history(client, make_user, database):
    """Real history in the test database, made through the API."""
    investments.load_default_prices()
    jane, john = make_user(), make_user()
    main = open_account(client, jane)
    savings = open_account(client, jane, name="Savings")
    johns = open_account(client, john)
    ok(client.simulate_post(f"{API}/accounts/{johns['id']}/primary", headers=john.headers), 200)
    deposit(client, jane, main["id"], "500.00", key="d-1")
    transfer(client, jane, main["id"], savings["id"], "120.00")
    pay(client, jane, john, "12.50", note="Lunch")
    card = ok(client.simulate_post(f"{API}/cards", headers=jane.headers, json={
        "account_id": main["id"], "type": "debit", "cardholder_name": "Jane Doe"}), 201)
    ok(client.simulate_post(f"{API}/cards/{card['id']}/payments", headers=jane.headers, json={
        "merchant_name": "Corner Shop", "merchant_category": "5411", "amount": "9.99",
        "currency": "USD", "channel": "chip"}), 201)
    brokerage = open_account(client, jane, type="investment", name="Brokerage")
    deposit(client, jane, brokerage["id"], "1000.00")
    ok(client.simulate_post(f"{API}/investments/orders", headers=jane.headers, json={
        "account_id": brokerage["id"], "symbol": "AAPL", "side": "buy", "quantity": "2"}), 201)
    dbm.release_connection()
    return pg_url()


def test_a_backup_restores_into_another_database_with_equal_digests(history, settings,
                                                                    scratch, tmp_path):
    before = digests(history)
    for table in ("cards", "investments", "audit_log", "transactions", "idempotency_keys",
                  "p2p_transactions", "transfers", "auth_tokens"):
        assert before[table][0] > 0, f"the history should include {table}"
    made = backup.backup(settings, tmp_path / "hoardrun.dump")
    assert made.size == made.path.stat().st_size > 0
    assert made.sha256 == backup.sha256_of(made.path)
    assert (tmp_path / "hoardrun.dump.sha256").read_text() == f"{made.sha256}  hoardrun.dump\n"
    assert made.path.stat().st_mode & 0o077 == 0  # personal data: owner only
    assert not list(tmp_path.glob("*.partial"))

    target = scratch()
    with bound(target) as target_settings:
        done = backup.restore(target_settings, made.path)
    assert done.problems == [] and done.migrations == [] and done.sha256 == made.sha256
    assert digests(target) == before
    # The restored ledger is still append-only: its triggers came back too.
    conn = psycopg2.connect(target)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error):
            cur.execute("UPDATE transactions SET amount = amount + 1")
    finally:
        conn.close()


def test_restore_applies_pending_migrations_then_verifies(scratch, tmp_path):
    source, target = scratch(), scratch()
    names = schema.all_migrations()
    with bound(source) as settings:
        schema.migrate(dbm.db.obj, target=names[-2])  # an older release's schema
        made = backup.backup(settings, tmp_path / "old.dump")
    with bound(target) as settings:
        done = backup.restore(settings, made.path)
        assert schema.pending_migrations(dbm.db.obj) == []
    assert done.migrations == names[-1:] and done.problems == []


def test_restore_reports_ledger_drift_in_the_backup(history, settings, scratch, tmp_path):
    conn = psycopg2.connect(history)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE accounts SET balance = balance + 1 WHERE id = "
                        "(SELECT id FROM accounts WHERE type = 'checking' LIMIT 1)")
    finally:
        conn.close()
    made = backup.backup(settings, tmp_path / "drift.dump")
    with bound(scratch()) as target_settings:
        done = backup.restore(target_settings, made.path)
    assert any("balance" in problem for problem in done.problems)


def test_a_non_empty_target_is_refused_without_force_and_always_in_production(
        history, settings, scratch, tmp_path):
    made = backup.backup(settings, tmp_path / "b.dump")
    target = scratch()
    with bound(target) as target_settings:
        backup.restore(target_settings, made.path)
    psql = psycopg2.connect(target)
    psql.autocommit = True
    with psql.cursor() as cur:
        cur.execute("CREATE TABLE stray (id int PRIMARY KEY)")
    psql.close()
    with bound(target) as target_settings:
        with pytest.raises(BackupError, match="is not empty.*--force"):
            backup.restore(target_settings, made.path)
    prod = dict(HOARDRUN_ENV="production", HOARDRUN_METRICS="false",
                HOARDRUN_SMTP_URL="smtp://127.0.0.1:2525",
                HOARDRUN_MAIL_FROM="no-reply@hoardrun.test")
    with bound(target, **prod) as target_settings:
        with pytest.raises(BackupError, match="production never restores over data"):
            backup.restore(target_settings, made.path, force=True)
    assert "stray" in digests(target)  # nothing was touched
    with bound(target) as target_settings:
        done = backup.restore(target_settings, made.path, force=True)
    assert done.problems == []
    assert digests(target) == digests(history)  # the stray table is gone with the old schema


def test_a_damaged_or_foreign_file_is_refused_before_anything_changes(history, settings,
                                                                      scratch, tmp_path):
    made = backup.backup(settings, tmp_path / "b.dump")
    with open(made.path, "ab") as handle:
        handle.write(b"\0")
    not_a_dump = tmp_path / "notes.txt"
    not_a_dump.write_text("hello")
    target = scratch()
    with bound(target) as target_settings:
        with pytest.raises(BackupError, match="does not match b.dump.sha256"):
            backup.restore(target_settings, made.path)
        with pytest.raises(BackupError, match="is not a usable backup"):
            backup.restore(target_settings, not_a_dump)
        with pytest.raises(BackupError, match="is not a file"):
            backup.restore(target_settings, tmp_path / "missing.dump")
    assert digests(target) == {}
    with pytest.raises(BackupError, match="already exists"):
        backup.backup(settings, made.path)


def test_the_password_travels_in_the_environment_never_on_the_command_line(
        settings, database, tmp_path, monkeypatch):
    parts = urlsplit(settings.database_url)
    secret = "Pa55-" + uuid.uuid4().hex
    # trust auth ignores the password, so the dump still works
    url = urlunsplit((parts.scheme, f"{parts.username or 'postgres'}:{secret}@{parts.hostname}"
                      f":{parts.port or 5432}", parts.path, parts.query, ""))
    seen = []
    real_run = subprocess.run

    def spy(args, **kwargs):
        seen.append((args, kwargs.get("env") or {}))
        return real_run(args, **kwargs)

    monkeypatch.setattr(backup.subprocess, "run", spy)
    monkeypatch.setenv("PGHOST", "elsewhere.invalid")  # the caller's libpq variables are ignored
    backup.backup(settings.replace(database_url=url), tmp_path / "p.dump")
    dumps = [(args, env) for args, env in seen if Path(args[0]).name == "pg_dump"
             and "--version" not in args]
    assert dumps, seen
    for args, env in dumps:
        assert not any(secret in arg for arg in args)
        assert env["PGPASSWORD"] == secret and "PGHOST" not in env


def run_task(env, *args, cwd):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("DATABASE_", "HOARDRUN_", "PG"))}
    full.update(env)
    proc = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
                          cwd=cwd, env=full, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def test_the_tasks_back_up_print_size_and_checksum_and_restore(history, environ, scratch,
                                                               tmp_path):
    done = run_task(environ, "db.backup", "--output", "nightly.dump", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    size = (tmp_path / "nightly.dump").stat().st_size
    sha = backup.sha256_of(tmp_path / "nightly.dump")
    assert f"size:    {size} bytes" in done.stdout and f"sha256:  {sha}" in done.stdout
    target = scratch()
    first = run_task(environ, "db.restore", "nightly.dump", "--target-url", target, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "ledger verified" in first.stdout
    assert digests(target) == digests(history)
    again = run_task(environ, "db.restore", "nightly.dump", "--target-url", target, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].endswith(
        "is not empty: restore into an empty database, or pass --force to replace its "
        "public schema")
    # A database that does not exist yet is created, as db.init would.
    fresh = _url_for(f"{urlsplit(target).path.lstrip('/')}_new")
    try:
        made = run_task(environ, "db.restore", "nightly.dump", "--target-url", fresh,
                        cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    finally:
        conn = _admin()
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{urlsplit(fresh).path.lstrip("/")}"')
        conn.close()
