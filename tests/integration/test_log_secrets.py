"""No secret reaches a log line or a database column in the clear.

One realistic session through the HTTP API on a real waitress server, with
every logger at DEBUG and the SQL echo on (``DATABASE_ECHO=true``, so every
statement's parameters are logged): register, a wrong password, login on
two devices, accounts and money, a card issue, a password change, a token
sent in a query string, a truncated JSON body holding the password, logout,
and the health probes. Then the captured log records (messages, arguments,
extras and tracebacks) and everything written to stdout/stderr are searched
for each password, bearer token, the full card number and the database
password, raw and in their JSON- and URL-escaped forms; and every table is
searched for the same secrets, with passwords and tokens found only as their
hashes.
"""

import json
import logging
import uuid
from urllib.parse import quote

import pytest

from hoardrun import db as dbm
from hoardrun.api import create_app
from hoardrun.config import load_settings
from hoardrun.security import hash_token, verify_password
from tests.conftest import base_environ
from tests.integration.conftest import LiveServer
from tests.integration.test_faults import call
from tests.integration.test_health_endpoints import with_password

API = "/api/v1"
PASSWORD = "Quartz-Meadow-4812!"
NEW_PASSWORD = "Velvet-Harbor-9037#"
WRONG_PASSWORD = "Lilac-Compass-5521$"
DB_PASSWORD = "Db-Canary-Pw-7731"
# Attributes every LogRecord has; anything else on a record is an ``extra`` to search too.
_STANDARD = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message", "asctime"}


class Capture(logging.Handler):
    """Keeps the full text of every record: message, args, extras, traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.records = []
        self.texts = []

    def emit(self, record):
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        with self.lock:
            self.records.append(record)
            self.texts.append(f"{self.format(record)} args={record.args!r} extra={extras!r}")

    def text(self):
        with self.lock:
            return "\n".join(self.texts)


@pytest.fixture
def all_logs():
    """Every logger at DEBUG into one capturing handler on the root (levels restored after)."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [lg for lg in list(manager.loggerDict.values())
                                        if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, lg.disabled, lg.propagate) for lg in loggers]
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    for lg in loggers:
        # NOTSET: inherit the root's DEBUG, whatever a module or earlier test set.
        lg.setLevel(logging.DEBUG if lg is root else logging.NOTSET)
        lg.disabled = False
        lg.propagate = True
    yield handler
    root.removeHandler(handler)
    for lg, level, disabled, propagate in saved:
        lg.setLevel(level)
        lg.disabled = disabled
        lg.propagate = propagate


@pytest.fixture
def session_environ(database_url):
    """This test's database, through a URL carrying a password, SQL echo on."""
    return base_environ(with_password(database_url, DB_PASSWORD), DATABASE_ECHO="true")


def variants(secret):
    """The forms a secret could take in a log line: raw, JSON-escaped, URL-encoded."""
    return {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote(secret)}


def ok(reply, status):
    assert reply.status == status, reply
    return reply.body


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def drive_a_session(server):
    """A user's whole story through the API; returns the secrets it produced, by name."""
    email = f"jane-{uuid.uuid4().hex[:10]}@example.com"
    secrets = {"password": PASSWORD, "new password": NEW_PASSWORD,
               "mistyped password": WRONG_PASSWORD}

    ok(call(server, "POST", f"{API}/auth/register",
            {"email": email, "password": PASSWORD, "first_name": "Jane", "last_name": "Doe"}),
       201)
    ok(call(server, "POST", f"{API}/auth/login", {"email": email, "password": WRONG_PASSWORD}),
       401)
    token = ok(call(server, "POST", f"{API}/auth/login",
                    {"email": email, "password": PASSWORD}), 200)["token"]
    other_device = ok(call(server, "POST", f"{API}/auth/login",
                           {"email": email, "password": PASSWORD}), 200)["token"]
    secrets.update({"token": token, "second device's token": other_device})
    me = bearer(token)
    ok(call(server, "GET", f"{API}/users/me", headers=me), 200)

    checking = ok(call(server, "POST", f"{API}/accounts",
                       {"type": "checking", "currency": "USD", "name": "Everyday"},
                       headers=me), 201)["id"]
    savings = ok(call(server, "POST", f"{API}/accounts",
                      {"type": "savings", "currency": "USD", "name": "Rainy day"},
                      headers=me), 201)["id"]
    ok(call(server, "POST", f"{API}/accounts/{checking}/deposits", {"amount": "500.00"},
            headers={**me, "Idempotency-Key": uuid.uuid4().hex}), 201)
    ok(call(server, "POST", f"{API}/transfers",
            {"from_account_id": checking, "to_account_id": savings, "amount": "120.00"},
            headers={**me, "Idempotency-Key": uuid.uuid4().hex}), 201)
    ok(call(server, "GET", f"{API}/accounts/{checking}/transactions", headers=me), 200)

    card = ok(call(server, "POST", f"{API}/cards",
                   {"account_id": checking, "type": "debit", "cardholder_name": "Jane Doe"},
                   headers=me), 201)
    number = card["number"]
    assert len(number) >= 12 and number.isdigit()
    secrets["card number"] = number
    shown = ok(call(server, "GET", f"{API}/cards/{card['id']}", headers=me), 200)
    assert number not in json.dumps(shown)

    ok(call(server, "POST", f"{API}/users/me/password",
            {"current_password": PASSWORD, "new_password": NEW_PASSWORD}, headers=me), 204)
    ok(call(server, "GET", f"{API}/users/me", headers=bearer(other_device)), 401)  # revoked
    # A client that puts its token in the URL: refused, and the URL is not logged whole.
    ok(call(server, "GET", f"{API}/users/me?access_token={token}"), 401)
    ok(call(server, "POST", f"{API}/auth/login", {"email": email, "password": PASSWORD}), 401)
    # A truncated body with the password in it: 400, and the body is not echoed to a log.
    truncated = json.dumps({"email": email, "password": NEW_PASSWORD})[:-1].encode()
    conn_reply = _raw_post(server, f"{API}/auth/login", truncated)
    assert conn_reply.status in (400, 422), conn_reply
    fresh = ok(call(server, "POST", f"{API}/auth/login",
                    {"email": email, "password": NEW_PASSWORD}), 200)["token"]
    secrets["token after the change"] = fresh
    ok(call(server, "GET", f"{API}/users/me", headers=bearer(fresh)), 200)
    ok(call(server, "POST", f"{API}/auth/logout", headers=bearer(fresh)), 204)
    ok(call(server, "GET", f"{API}/users/me", headers=bearer(fresh)), 401)
    ok(call(server, "GET", f"{API}/users/me", headers=me), 200)  # kept through the change

    for probe in ("/api/health/", "/api/health/detailed", "/api/health/database",
                  "/api/health/readiness"):
        ok(call(server, "GET", probe), 200)
    return email, secrets


def _raw_post(server, path, data):
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=20)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp
    finally:
        conn.close()


def everything_stored(database):
    """Every value of every row of every table, as text."""
    lines = []
    for table in database.get_tables():
        for row in database.execute_sql(f'SELECT * FROM "{table}"').fetchall():
            # Binary columns as latin-1, so plaintext stored as bytes still shows.
            lines.append(f"{table}: " + " | ".join(
                bytes(v).decode("latin-1") if isinstance(v, (bytes, memoryview)) else str(v)
                for v in row))
    return "\n".join(lines)


def test_a_whole_session_leaves_no_secret_in_logs_or_in_the_clear_in_the_database(
        session_environ, all_logs, capfd):
    settings = load_settings(session_environ)
    database = dbm.init_db(settings)
    try:
        with LiveServer(create_app(settings), settings) as server:
            email, secrets = drive_a_session(server)
        secrets["database password"] = DB_PASSWORD
        out, err = capfd.readouterr()
        logged = all_logs.text() + "\n" + out + "\n" + err

        # The capture really saw the session: access lines, SQL with its parameters...
        for line in ("POST /api/v1/auth/login 200", "POST /api/v1/users/me/password 204",
                     "POST /api/v1/cards 201", "POST /api/v1/transfers 201"):
            assert line in logged, line
        sql_lines = [r for r in all_logs.records if r.name == "peewee"]
        assert any("INSERT INTO" in r.getMessage() and "users" in r.getMessage()
                   for r in sql_lines)
        # ...so a token passed to SQL as itself would have shown: only its hash did.
        assert hash_token(secrets["token"]) in logged
        for name, secret in secrets.items():
            for form in variants(secret):
                assert form not in logged, f"the {name} appears in the logs"

        stored = everything_stored(database)
        for name, secret in secrets.items():
            if name == "database password":
                continue
            for form in variants(secret):
                assert form not in stored, f"the {name} is stored in the clear"
        (password_hash,) = database.execute_sql(
            "SELECT password_hash FROM users WHERE email = %s", (email,)).fetchone()
        assert password_hash.startswith("$argon2id$")
        assert verify_password(password_hash, NEW_PASSWORD)
        assert not verify_password(password_hash, PASSWORD)
        token_hashes = {row[0] for row in database.execute_sql(
            "SELECT token_hash FROM auth_tokens").fetchall()}
        issued = {hash_token(secrets[n]) for n in ("token", "second device's token",
                                                   "token after the change")}
        assert token_hashes == issued
    finally:
        database.close_all()
