"""Hostile input, one table: each is refused with the right problem and changes nothing.

Every row of ``CASES`` is one request a careless or hostile client could
send to a real waitress server: broken JSON, the wrong media type, huge or
absurdly deep bodies, money written every wrong way, unknown currencies,
ids built to escape a path or a query, edited cursors, dead tokens, an
ordinary user knocking on admin routes, money sent to oneself, and names
full of control characters. For each:

* the answer is the row's 4xx status as ``application/problem+json`` whose
  ``type`` ends in the row's problem code (and names the offending field
  where the row says which);
* the body shows no traceback, SQL or driver text;
* the database is exactly as it was: every table's row count AND content,
  and every account balance, compared before and after. The one refusal
  that writes by design (a wrong password counts towards the login lockout
  and is audited) says so in its row (``writes``) and is checked for exactly that.
"""

import hashlib
import http.client
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from money_helpers import API, ok, open_account

import helpers
from hoardrun import auth, investments, ledger, schema
from hoardrun.config import DEFAULT_MAX_BODY_BYTES
from hoardrun.db import db
from tests.integration.conftest import LiveServer

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://hoardrun.dev/problems/"
CLIENT_TIMEOUT = 30
# Text that must never reach a client: tracebacks, SQL and driver/ORM names.
LEAKS = ("Traceback", 'File "', "SELECT ", "INSERT ", "UPDATE ", "psycopg2",
         "peewee", "IntegrityError", "OperationalError")


@dataclass(frozen=True)
class Case:
    """One hostile request and the refusal it must get."""

    id: str
    method: str
    path: str                        # may name World attributes: {acc}, {card}, ...
    status: int
    code: str                        # problem type suffix
    body: Any = None                 # bytes as is; a callable(world) -> JSON value or bytes
    headers: dict = field(default_factory=dict)
    token: str = "jane"              # which World token (None: no Authorization header)
    content_type: str | None = "application/json"
    error_field: str | None = None   # the field the problem names, when it must name one
    writes: dict = field(default_factory=dict)   # table -> rows a refusal adds by design


def js(**body):
    """A JSON body whose string values may name World attributes ("{acc}")."""
    return lambda w: {k: (v.format(**w.names) if isinstance(v, str) else v)
                      for k, v in body.items()}


DEPOSIT = "/accounts/{acc}/deposits"
NESTED = 10_000
CASES = [
    # -- malformed, truncated and mistyped bodies --------------------------------------
    Case("malformed-json", "POST", DEPOSIT, 400, "malformed-request", body=b'{"amount": 1.00,,}'),
    Case("truncated-json", "POST", "/transfers", 400, "malformed-request",
         body=lambda w: json.dumps({"from_account_id": w.acc, "to_account_id": w.acc2,
                                    "amount": "1.00"}).encode()[:-12]),
    Case("invalid-utf8", "POST", DEPOSIT, 400, "malformed-request", body=b'{"amount": "\xff\xfe"}'),
    Case("json-array-body", "POST", DEPOSIT, 422, "validation-error", body=b'["1.00"]'),
    Case("json-string-body", "POST", DEPOSIT, 422, "validation-error", body=b'"1.00"'),
    Case("empty-body", "POST", "/transfers", 422, "validation-error", body=b""),
    Case("form-content-type", "POST", DEPOSIT, 415, "unsupported-media-type",
         body=b"amount=5.00", content_type="application/x-www-form-urlencoded"),
    Case("text-plain-content-type", "POST", DEPOSIT, 415, "unsupported-media-type",
         body=b'{"amount": "5.00"}', content_type="text/plain"),
    Case("multipart-content-type", "POST", "/accounts", 415, "unsupported-media-type",
         body=b"--x\r\n\r\nUSD\r\n--x--", content_type="multipart/form-data; boundary=x"),
    # A body must say it is JSON: guessing lets a form or text body move money.
    Case("missing-content-type-form-body", "POST", DEPOSIT, 415, "unsupported-media-type",
         body=b"amount=5.00", content_type=None),
    Case("missing-content-type-json-body", "POST", DEPOSIT, 415, "unsupported-media-type",
         body=b'{"amount": "5.00"}', content_type=None),
    Case("missing-content-type-json-transfer", "POST", "/transfers", 415,
         "unsupported-media-type", content_type=None,
         body=lambda w: json.dumps({"from_account_id": w.acc, "to_account_id": w.acc2,
                                    "amount": "1.00"}).encode()),
    # The last of two equal keys would win: 1.00 shown to a reviewer, 900.00 deposited.
    Case("duplicate-amount-key", "POST", DEPOSIT, 400, "malformed-request",
         body=b'{"amount":"1.00","amount":"900.00"}'),
    Case("duplicate-key-nested", "POST", "/transfers", 400, "malformed-request",
         body=lambda w: ('{"from_account_id":"%s","to_account_id":"%s","to_account_id":"%s",'
                         '"amount":"1.00"}' % (w.acc, w.acc2, w.john_acc)).encode()),
    Case("oversized-body", "POST", DEPOSIT, 413, "content-too-large",
         body=b'{"amount": "1.00", "description": "' + b"x" * DEFAULT_MAX_BODY_BYTES + b'"}'),
    Case("nested-10000-levels", "POST", DEPOSIT, 400, "malformed-request",
         body=b'{"amount": ' + b"[" * NESTED + b"]" * NESTED + b"}"),
    Case("unknown-field", "POST", DEPOSIT, 422, "validation-error",
         body=js(amount="1.00", status="completed"), error_field="status"),
    # -- amounts --------------------------------------------------------------------------
    Case("amount-float", "POST", DEPOSIT, 422, "validation-error", body=b'{"amount": 10.5}',
         error_field="amount"),
    Case("amount-integer", "POST", DEPOSIT, 422, "validation-error", body=b'{"amount": 10}',
         error_field="amount"),
    Case("amount-exponent", "POST", DEPOSIT, 422, "invalid-amount", body=js(amount="1e3"),
         error_field="amount"),
    Case("amount-exponent-number", "POST", DEPOSIT, 422, "validation-error",
         body=b'{"amount": 1e3}', error_field="amount"),
    Case("amount-nan-token", "POST", DEPOSIT, 400, "malformed-request", body=b'{"amount": NaN}'),
    Case("amount-infinity-token", "POST", DEPOSIT, 400, "malformed-request",
         body=b'{"amount": Infinity}'),
    Case("amount-minus-infinity-token", "POST", "/transfers", 400, "malformed-request",
         body=lambda w: ('{"from_account_id": "%s", "to_account_id": "%s", "amount": -Infinity}'
                         % (w.acc, w.acc2)).encode()),
    Case("amount-nan-string", "POST", DEPOSIT, 422, "invalid-amount", body=js(amount="NaN"),
         error_field="amount"),
    Case("amount-infinity-string", "POST", "/accounts/{acc}/withdrawals", 422, "invalid-amount",
         body=js(amount="Infinity"), error_field="amount"),
    Case("amount-negative", "POST", "/transfers", 422, "invalid-amount",
         body=js(from_account_id="{acc}", to_account_id="{acc2}", amount="-5.00"),
         error_field="amount"),
    Case("amount-zero", "POST", "/p2p", 422, "invalid-amount",
         body=js(recipient_email="{john_email}", amount="0.00"), error_field="amount"),
    Case("amount-over-precise-usd", "POST", "/transfers", 422, "invalid-amount",
         body=js(from_account_id="{acc}", to_account_id="{acc2}", amount="1.001"),
         error_field="amount"),
    Case("amount-over-range", "POST", DEPOSIT, 422, "invalid-amount",
         body=js(amount="100000000000000000000"), error_field="amount"),
    Case("amount-just-over-max", "POST", DEPOSIT, 422, "invalid-amount",
         body=js(amount="10000000000000.01"), error_field="amount"),
    Case("amount-thousands-separator", "POST", DEPOSIT, 422, "invalid-amount",
         body=js(amount="1,000.00"), error_field="amount"),
    Case("amount-hex", "POST", DEPOSIT, 422, "invalid-amount", body=js(amount="0x10"),
         error_field="amount"),
    Case("amount-leading-space", "POST", DEPOSIT, 422, "invalid-amount", body=js(amount=" 5.00"),
         error_field="amount"),
    Case("amount-trailing-space", "POST", "/transfers", 422, "invalid-amount",
         body=js(from_account_id="{acc}", to_account_id="{acc2}", amount="5.00 "),
         error_field="amount"),
    Case("amount-trailing-newline", "POST", DEPOSIT, 422, "invalid-amount",
         body=js(amount="5.00\n"), error_field="amount"),
    Case("amount-tab", "POST", "/p2p", 422, "invalid-amount",
         body=js(recipient_email="{john_email}", amount="\t5.00"), error_field="amount"),
    Case("amount-arabic-indic-digits", "POST", DEPOSIT, 422, "invalid-amount",
         body=js(amount="\u0661\u0662"), error_field="amount"),
    Case("card-limit-exponent", "PATCH", "/cards/{card}/limits", 422, "invalid-amount",
         body=js(daily_limit="1e3")),
    Case("order-quantity-exponent", "POST", "/investments/orders", 422, "validation-error",
         body=js(account_id="{brk}", symbol="AAPL", side="buy", quantity="1e3"),
         error_field="quantity"),
    # quantity x price overflows a BIGINT of cents (a 500 on PostgreSQL once).
    Case("order-quantity-over-range", "POST", "/investments/orders", 422, "invalid-amount",
         body=js(account_id="{brk}", symbol="AAPL", side="buy", quantity="9999999999999999")),
    Case("withdraw-past-overdraft", "POST", "/accounts/{acc}/withdrawals", 422,
         "insufficient-funds", body=js(amount="5000.00")),
    # -- currencies -----------------------------------------------------------------------
    Case("currency-unknown", "POST", "/accounts", 422, "unknown-currency",
         body=js(type="checking", currency="XYZ", name="Mine"), error_field="currency"),
    Case("currency-lower-case", "POST", "/accounts", 422, "unknown-currency",
         body=js(type="checking", currency="usd", name="Mine"), error_field="currency"),
    Case("currency-two-letters", "POST", "/accounts", 422, "validation-error",
         body=js(type="checking", currency="US", name="Mine"), error_field="currency"),
    Case("currency-other-than-accounts", "POST", "/transfers", 422, "currency-mismatch",
         body=js(from_account_id="{acc}", to_account_id="{acc2}", amount="1.00",
                 currency="EUR")),
    Case("transfer-across-currencies", "POST", "/transfers", 422, "currency-mismatch",
         body=js(from_account_id="{acc}", to_account_id="{eur}", amount="1.00")),
    Case("card-payment-lower-case-currency", "POST", "/cards/{card}/payments", 422,
         "unknown-currency", body=js(merchant_name="Shop", merchant_category="5411",
                                     amount="1.00", currency="usd", channel="chip")),
    # -- path ids and filter values ---------------------------------------------------------
    Case("path-id-sql-injection", "GET", "/accounts/1'%20OR%20'1'='1", 404, "not-found"),
    Case("path-id-dot-dot", "GET", "/accounts/../users/me", 404, "not-found"),
    Case("path-id-encoded-nul", "GET", "/accounts/%00", 404, "not-found"),
    Case("path-id-sql-injection-deposit", "POST", "/accounts/1;DROP%20TABLE%20accounts/deposits",
         404, "not-found", body=js(amount="1.00")),
    Case("path-id-10000-chars", "GET", "/accounts/" + "7" * 10_000, 404, "not-found"),
    Case("path-symbol-nul-as-admin", "PUT", "/admin/prices/AA%00PL", 422, "validation-error",
         body=js(price="1.00"), token="admin", error_field="symbol"),
    Case("path-id-unknown-uuid", "GET", "/transfers/00000000-0000-4000-8000-000000000000", 404,
         "not-found"),
    Case("path-id-foreign-account", "GET", "/accounts/{john_acc}", 404, "not-found"),
    Case("deposit-into-foreign-account", "POST", "/accounts/{john_acc}/deposits", 404,
         "not-found", body=js(amount="1.00")),
    Case("transfer-from-foreign-account", "POST", "/transfers", 404, "not-found",
         body=js(from_account_id="{john_acc}", to_account_id="{acc}", amount="1.00")),
    Case("filter-type-sql-injection", "GET", "/accounts/{acc}/transactions?type=%27%20OR%20%271%27%3D%271",
         422, "validation-error", error_field="type"),
    Case("filter-uuid-sql-injection", "GET", "/transfers?account_id=1%27%20OR%20%271%27%3D%271",
         422, "validation-error", error_field="account_id"),
    Case("filter-date-sql-injection", "GET",
         "/accounts/{acc}/transactions?from=2024-01-01%27%3B%20DROP%20TABLE%20users%3B--", 422,
         "validation-error", error_field="from"),
    Case("filter-amount-sql-injection", "GET", "/accounts/{acc}/transactions?min_amount=0%20OR%201%3D1",
         422, "invalid-amount", error_field="min_amount"),
    # Valid ISO 8601 whose offset leaves years 1-9999 in UTC (a 500 once).
    Case("filter-time-before-year-1-in-utc", "GET",
         "/accounts/{acc}/transactions?to=0001-01-01T00:00:00%2B01:00", 422, "validation-error",
         error_field="to"),
    Case("statement-time-after-year-9999-in-utc", "GET",
         "/accounts/{acc}/statement?from=9999-12-31T23:59:59-23:59", 422, "validation-error",
         error_field="from"),
    Case("filter-nul-byte", "GET", "/admin/audit?entity_type=account%00", 422, "validation-error",
         token="admin", error_field="entity_type"),
    Case("filter-unknown-parameter", "GET", "/transfers?user_id={john_id}", 422,
         "validation-error", error_field="user_id"),
    Case("limit-zero", "GET", "/p2p?limit=0", 422, "validation-error", error_field="limit"),
    Case("limit-huge", "GET", "/accounts/{acc}/transactions?limit=1000000", 422,
         "validation-error", error_field="limit"),
    # -- cursors --------------------------------------------------------------------------
    Case("cursor-tampered", "GET", "/accounts/{acc}/transactions?limit=1&cursor={tampered}", 422,
         "invalid-cursor", error_field="cursor"),
    Case("cursor-garbage", "GET", "/accounts/{acc}/transactions?cursor=AAAA.BBBB", 422,
         "invalid-cursor", error_field="cursor"),
    Case("cursor-other-filters", "GET",
         "/accounts/{acc}/transactions?limit=1&direction=inbound&cursor={cursor}", 422,
         "invalid-cursor", error_field="cursor"),
    Case("cursor-other-account", "GET", "/accounts/{acc2}/transactions?limit=1&cursor={cursor}",
         422, "invalid-cursor", error_field="cursor"),
    # -- tokens and roles -----------------------------------------------------------------
    Case("no-token", "GET", "/accounts", 401, "unauthorized", token=None),
    Case("expired-token", "POST", DEPOSIT, 401, "unauthorized", body=js(amount="1.00"),
         token="expired"),
    Case("revoked-token", "GET", "/users/me", 401, "unauthorized", token="revoked"),
    Case("suspended-users-token", "GET", "/accounts", 401, "unauthorized", token="suspended"),
    Case("garbage-token", "GET", "/accounts", 401, "unauthorized", token="garbage"),
    Case("basic-auth-scheme", "GET", "/accounts", 401, "unauthorized", token=None,
         headers={"Authorization": "Basic amFuZUBleGFtcGxlLmNvbTpzZWNyZXQ="}),
    Case("foreign-token-on-my-account", "POST", DEPOSIT, 404, "not-found",
         body=js(amount="1.00"), token="john"),
    Case("admin-list-users-as-user", "GET", "/admin/users", 403, "forbidden"),
    Case("admin-freeze-as-user", "POST", "/admin/accounts/{john_acc}/freeze", 403, "forbidden",
         body=js(reason="mine now")),
    Case("admin-reverse-as-user", "POST", "/admin/transactions/{entry}/reverse", 403,
         "forbidden", body=js()),
    Case("admin-suspend-as-user", "POST", "/admin/users/{john_id}/suspend", 403, "forbidden",
         body=js()),
    Case("admin-set-price-as-user", "PUT", "/admin/prices/AAPL", 403, "forbidden",
         body=js(price="0.01")),
    Case("wrong-password-login", "POST", "/auth/login", 401, "invalid-credentials",
         body=js(email="{jane_email}", password="not-her-password-1"), token=None,
         # By design: the failure counts towards the lockout and is audited.
         writes={"audit_log": 1, "users": 0}),
    # -- self-transfers -------------------------------------------------------------------
    Case("transfer-to-same-account", "POST", "/transfers", 422, "same-account",
         body=js(from_account_id="{acc}", to_account_id="{acc}", amount="1.00")),
    Case("pay-myself-by-email", "POST", "/p2p", 422, "same-account",
         body=js(recipient_email="{jane_email}", amount="1.00")),
    Case("pay-myself-by-id", "POST", "/p2p", 422, "same-account",
         body=js(recipient_user_id="{jane_id}", amount="1.00")),
    # -- names and text -------------------------------------------------------------------
    Case("account-name-10000-chars", "POST", "/accounts", 422, "validation-error",
         body=js(type="checking", currency="USD", name="A" * 10_000), error_field="name"),
    Case("account-name-nul", "POST", "/accounts", 422, "validation-error",
         body=js(type="checking", currency="USD", name="Rent\x00Money"), error_field="name"),
    Case("account-name-control-chars", "POST", "/accounts", 422, "validation-error",
         body=js(type="checking", currency="USD", name="Rent\x1b[2J\x07"), error_field="name"),
    Case("account-rename-bidi-override", "PATCH", "/accounts/{acc}", 422, "validation-error",
         body=js(name="Savings\u202egnp.exe"), error_field="name"),
    Case("account-rename-blank", "PATCH", "/accounts/{acc}", 422, "validation-error",
         body=js(name="   "), error_field="name"),
    Case("first-name-10000-chars", "PATCH", "/users/me", 422, "validation-error",
         body=js(first_name="B" * 10_000), error_field="first_name"),
    Case("first-name-nul", "PATCH", "/users/me", 422, "validation-error",
         body=js(first_name="Jane\x00"), error_field="first_name"),
    Case("last-name-newline", "PATCH", "/users/me", 422, "validation-error",
         body=js(last_name="Doe\nAdmin: yes"), error_field="last_name"),
    Case("login-email-nul", "POST", "/auth/login", 422, "validation-error",
         body=js(email="{jane_email}\x00", password="Zebra-Lantern-73"), token=None,
         error_field="email"),
    Case("register-email-nul", "POST", "/auth/register", 422, "validation-error",
         body=js(email="eve\x00@example.com", password="Zebra-Lantern-73", first_name="Eve",
                 last_name="Hacker"), token=None, error_field="email"),
    Case("cardholder-name-control-chars", "POST", "/cards", 422, "validation-error",
         body=js(account_id="{acc}", type="debit", cardholder_name="JANE\tDOE\x1b"),
         error_field="cardholder_name"),
    Case("transfer-description-10000-chars", "POST", "/transfers", 422, "validation-error",
         body=js(from_account_id="{acc}", to_account_id="{acc2}", amount="1.00",
                 description="d" * 10_000), error_field="description"),
    Case("idempotency-key-too-long", "POST", DEPOSIT, 422, "validation-error",
         body=js(amount="1.00"), headers={"Idempotency-Key": "k" * 300}),
    Case("idempotency-key-with-spaces", "POST", DEPOSIT, 422, "validation-error",
         body=js(amount="1.00"), headers={"Idempotency-Key": "two words"},
         error_field="Idempotency-Key"),
    Case("method-not-allowed", "DELETE", "/accounts/{acc}", 405, "method-not-allowed"),
]


class World:
    """Jane (the caller), John (someone else), an admin, and dead tokens; their ids."""

    def __init__(self, client):
        jane = helpers.make_user(client, first_name="Jane", last_name="Doe")
        john = helpers.make_user(client, first_name="John", last_name="Smith")
        admin = helpers.make_user(client, role="admin")
        suspended = helpers.make_user(client, first_name="Sam", last_name="Pended")
        acc = open_account(client, jane, "USD", "Everyday")
        acc2 = open_account(client, jane, "USD", "Savings", type="savings")
        eur = open_account(client, jane, "EUR", "Euro")
        john_acc = open_account(client, john, "USD", "John's")
        brk = open_account(client, jane, "USD", "Brokerage", type="investment")
        investments.load_default_prices()
        for account, minor in ((acc, 100_000), (acc2, 5_000), (eur, 5_000), (john_acc, 7_000),
                               (brk, 50_000)):
            ledger.deposit(account["id"], minor)
        entry = ledger.deposit(acc["id"], 2_500).credit.entry_id
        card = ok(client.simulate_post(f"{API}/cards", headers=jane.headers, json={
            "account_id": acc["id"], "type": "debit", "cardholder_name": "Jane Doe"}), 201)
        # Two entries on acc, so a page of one has a next cursor.
        cursor = ok(client.simulate_get(f"{API}/accounts/{acc['id']}/transactions",
                                        headers=jane.headers, params={"limit": 1}),
                    200)["next_cursor"]
        assert cursor
        middle = len(cursor) // 3
        tampered = cursor[:middle] + ("A" if cursor[middle] != "A" else "B") + cursor[middle + 1:]

        expired, _ = auth.issue_token(jane.id, ttl=60, now=auth.utcnow() - timedelta(hours=2))
        revoked, _ = auth.issue_token(jane.id)
        auth.revoke(revoked)
        client.simulate_post(f"{API}/admin/users/{suspended.id}/suspend",
                             headers=admin.headers, json={})
        self.tokens = {"jane": jane.token, "john": john.token, "admin": admin.token,
                       "expired": expired, "revoked": revoked, "suspended": suspended.token,
                       "garbage": "' OR '1'='1"}
        self.names = {"acc": acc["id"], "acc2": acc2["id"], "eur": eur["id"], "brk": brk["id"],
                      "john_acc": john_acc["id"], "card": card["id"], "entry": str(entry),
                      "cursor": cursor, "tampered": tampered, "jane_email": jane.email,
                      "jane_id": str(jane.id), "john_email": john.email,
                      "john_id": str(john.id)}
        for name, value in self.names.items():
            setattr(self, name, value)


def snapshot():
    """Every table's row count and a digest of its rows, and every account balance."""
    tables = sorted(t for t in db.get_tables() if t != schema.MIGRATE_TABLE)
    state = {}
    for table in tables:
        rows = db.execute_sql(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
        state[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
    balances = dict(db.execute_sql("SELECT id, balance FROM accounts").fetchall())
    return state, balances


def send(server, world, case):
    """Send ``case`` over a fresh connection; return ``(status, content type, body text)``."""
    body = case.body(world) if callable(case.body) else case.body
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    headers = dict(case.headers)
    if case.token is not None:
        headers["Authorization"] = f"Bearer {world.tokens[case.token]}"
    if case.content_type is not None and body is not None:
        headers["Content-Type"] = case.content_type
    conn = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request(case.method, API + case.path.format(**world.names), body=body,
                     headers=headers)
        response = conn.getresponse()
        return (response.status, response.getheader("Content-Type", ""),
                response.read().decode("utf-8", "replace"))
    finally:
        conn.close()


class CurrentApp:
    """A WSGI app that hands each request to the running test's app."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def servers():
    """One waitress server for the whole table, stopped at the end.

    Each case gets a fresh database and app; only the server is shared, so
    ~200 cases do not start and stop ~200 servers (slower, and stopping an
    embedded waitress that often once hit EBADF on its trigger pipe).
    """
    running = []
    yield running
    for _, server in running:
        server.__exit__(None, None, None)


@pytest.fixture
def server(servers, app, settings):
    """The shared server, now serving this test's ``app``."""
    if not servers:
        current = CurrentApp()
        servers.append((current, LiveServer(current, settings, threads=2).__enter__()))
    current, live = servers[0]
    current.app = app
    yield live
    current.app = None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_with_the_right_problem_and_changes_nothing(
        case, client, server):
    """One hostile request: its 4xx problem, no leak, and the database exactly as before."""
    world = World(client)
    db.close()
    before_tables, before_balances = snapshot()

    status, content_type, text = send(server, world, case)

    assert status == case.status, (status, text[:500])
    assert content_type.startswith(PROBLEM_JSON), content_type
    problem = json.loads(text)
    assert problem["type"] == PROBLEM_BASE + case.code, problem
    assert problem["status"] == status and problem["title"] and problem["detail"], problem
    if case.error_field is not None:
        assert case.error_field in {e["field"] for e in problem.get("errors") or ()}, problem
    for leak in LEAKS:
        assert leak not in text, (leak, text[:500])

    after_tables, after_balances = snapshot()
    assert after_balances == before_balances
    for table, (count, digest) in before_tables.items():
        if table in case.writes:
            assert after_tables[table][0] == count + case.writes[table], table
        else:
            assert after_tables[table] == (count, digest), f"{table} changed"
