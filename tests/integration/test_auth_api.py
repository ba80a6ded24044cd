"""/api/v1/auth as a client sees it: register, login, lockout, logout, bearer tokens."""

import hashlib
import http.client
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from falcon import testing
from helpers import API, PASSWORD, bearer, login, login_token, register, unique_email

from hoardrun.api import create_app
from hoardrun.config import load_settings
from hoardrun.db import db
from hoardrun.models import AuditLog, User
from tests.integration.conftest import LiveServer

PROBLEM = "https://hoardrun.dev/problems/"


@pytest.fixture
def timed_client(settings, database, clock):
    """A client over an app whose clock the test controls."""
    return testing.TestClient(create_app(settings, clock=clock))


def table_text(table):
    """Every row of ``table`` as one string (to prove a secret is not in it)."""
    return repr(db.execute_sql(f"SELECT * FROM {table}").fetchall())


def audit_rows(action, entity_id=None):
    query = AuditLog.select().where(AuditLog.action == action)
    if entity_id is not None:
        query = query.where(AuditLog.entity_id == str(entity_id))
    return list(query)


def me(client, token):
    return client.simulate_get(f"{API}/users/me", headers=bearer(token))


# -- register -----------------------------------------------------------------------

def test_register_answers_201_with_location_and_stores_only_a_password_hash(client):
    email = unique_email("Jane.Doe")  # mixed case on purpose
    result = register(client, email, phone="+44 20 7946 0958", country="gb",
                      headers={"X-Request-ID": "register-req-1"})

    assert result.status_code == 201, result.text
    assert result.headers["Location"] == f"{API}/users/me"
    body = result.json
    assert body["email"] == email.lower()
    assert (body["phone"], body["country"]) == ("+442079460958", "GB")
    assert (body["role"], body["status"]) == ("user", "active")
    assert not {"password", "password_hash"} & set(body)

    user = User.get_by_id(uuid.UUID(body["id"]))
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in table_text("users")

    [row] = audit_rows("user.register", body["id"])
    assert row.request_id == "register-req-1"
    assert str(row.actor_id) == body["id"]
    assert json.loads(row.after)["email"] == email.lower()
    assert PASSWORD not in (row.after or "") and "argon2" not in (row.after or "")


def test_register_refuses_a_taken_email_in_any_letter_case_with_409(client):
    email = unique_email("taken")
    assert register(client, email).status_code == 201

    again = register(client, email.upper(), first_name="Other")

    assert again.status_code == 409
    assert again.json["type"] == PROBLEM + "conflict"
    assert again.json["errors"][0]["field"] == "email"
    assert User.select().where(User.email == email.lower()).count() == 1


@pytest.mark.parametrize("fields, bad_field", [
    ({"email": "not-an-email"}, "email"),
    ({"password": "short1!"}, "password"),
    ({"password": "password123"}, "password"),            # too common
    ({"email": "marigold@example.com", "password": "marigold-2024"}, "password"),
    ({"password": "onlyletterslong"}, "password"),
    ({"phone": "0207 946 0958"}, "phone"),                 # not E.164: no +country
    ({"phone": "+0123456"}, "phone"),
    ({"country": "XX"}, "country"),
    ({"first_name": "   "}, "first_name"),
    ({"last_name": "x" * 101}, "last_name"),
    ({"role": "admin"}, "role"),                           # nobody signs up as admin
])
def test_register_refuses_bad_input_with_422_naming_the_field(client, fields, bad_field):
    result = register(client, **fields)

    assert result.status_code == 422, result.text
    assert bad_field in {e["field"] for e in result.json["errors"]}
    assert User.select().count() == 0


# -- login --------------------------------------------------------------------------

def test_login_returns_a_bearer_token_that_is_stored_only_as_its_hash(client, settings):
    email = unique_email("login")
    user_id = register(client, email).json["id"]

    before = datetime.now(timezone.utc)
    result = login(client, email.upper(), headers={"X-Request-ID": "login-req-1"})

    assert result.status_code == 200, result.text
    body = result.json
    assert body["token_type"] == "Bearer"
    expires_at = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=settings.token_ttl - 60) < expires_at
    assert expires_at <= datetime.now(timezone.utc) + timedelta(seconds=settings.token_ttl)
    assert "no-store" in result.headers["Cache-Control"]

    assert me(client, body["token"]).json["id"] == user_id
    stored = table_text("auth_tokens")
    assert body["token"] not in stored
    assert hashlib.sha256(body["token"].encode()).hexdigest() in stored
    assert User.get_by_id(uuid.UUID(user_id)).last_login_at is not None
    [row] = audit_rows("auth.login", user_id)
    assert row.request_id == "login-req-1" and body["token"] not in (row.after or "")


def test_wrong_password_and_unknown_email_get_the_same_401(client):
    email = unique_email("known")
    register(client, email)

    wrong = login(client, email, "Wrong-Password-1")
    unknown = login(client, unique_email("nobody"), "Wrong-Password-1")

    for result in (wrong, unknown):
        assert result.status_code == 401
        assert result.headers["WWW-Authenticate"].startswith("Bearer")
    strip = ("request_id", "instance")
    assert ({k: v for k, v in wrong.json.items() if k not in strip}
            == {k: v for k, v in unknown.json.items() if k not in strip})
    assert wrong.json["type"] == PROBLEM + "invalid-credentials"


def test_five_failed_logins_lock_the_email_with_429_until_the_lock_ends(timed_client, clock):
    email = unique_email("locked")
    register(timed_client, email)

    for _ in range(5):
        assert login(timed_client, email, "Wrong-Password-1").status_code == 401
    locked = login(timed_client, email)  # even the right password

    assert locked.status_code == 429
    assert locked.json["type"] == PROBLEM + "too-many-attempts"
    assert 1 <= int(locked.headers["Retry-After"]) <= 15 * 60
    user = User.get(User.email == email.lower())
    assert user.failed_logins == 5 and user.locked_until > clock.now

    clock.advance(minutes=15, seconds=1)
    assert login(timed_client, email).status_code == 200
    assert User.get(User.email == email.lower()).failed_logins == 0


def test_failures_more_than_15_minutes_apart_do_not_add_up_to_a_lock(timed_client, clock):
    email = unique_email("slow")
    register(timed_client, email)

    for _ in range(4):
        assert login(timed_client, email, "Wrong-Password-1").status_code == 401
    clock.advance(minutes=16)
    assert login(timed_client, email, "Wrong-Password-1").status_code == 401

    assert login(timed_client, email).status_code == 200


def test_an_unknown_email_is_locked_like_a_known_one(client):
    email = unique_email("ghost")

    answers = [login(client, email, "Wrong-Password-1").status_code for _ in range(6)]

    assert answers == [401] * 5 + [429]


BURST = 25


def login_burst(server, email, passwords):
    """POST every password for ``email`` at once from its own connection; return the statuses."""
    barrier = threading.Barrier(len(passwords))
    statuses = [None] * len(passwords)

    def attempt(i):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        try:
            body = json.dumps({"email": email, "password": passwords[i]})
            barrier.wait()
            conn.request("POST", f"{API}/auth/login", body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            statuses[i] = response.status
        finally:
            conn.close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(passwords))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@pytest.fixture
def wide_server(app, settings):
    """A real waitress server with a thread per concurrent login (so they really race)."""
    with LiveServer(app, settings, threads=BURST) as server:
        yield server


@pytest.mark.parametrize("who", ["registered", "unknown"])
def test_a_burst_of_concurrent_wrong_passwords_gets_at_most_five_verdicts(client, wide_server,
                                                                          who):
    email = unique_email("burst")
    if who == "registered":
        assert register(client, email).status_code == 201

    statuses = login_burst(wide_server, email, ["Wrong-Password-1"] * BURST)

    assert statuses.count(401) <= 5, statuses
    assert statuses.count(401) + statuses.count(429) == BURST, statuses
    assert login(client, email).status_code == 429  # and the email is locked now


def test_the_right_password_inside_a_burst_counts_as_one_of_the_five(client, wide_server):
    """It is let through only within the first five attempts; otherwise the lock holds."""
    email = unique_email("burst")
    assert register(client, email).status_code == 201
    passwords = ["Wrong-Password-1"] * (BURST - 1) + [PASSWORD]

    statuses = login_burst(wide_server, email, passwords)

    verdicts = [s for s in statuses if s in (200, 401)]
    assert len(verdicts) <= 5, statuses
    assert set(statuses) <= {200, 401, 429}, statuses
    if statuses[-1] == 429:
        # The right password came too late: it neither logged in nor cleared the count.
        assert login(client, email).status_code == 429
        assert User.get(User.email == email).failed_logins == 5


def test_a_suspended_user_cannot_log_in_and_their_token_stops_working(client, make_user):
    jane = make_user(via_api=True)
    admin = make_user(role="admin")

    suspended = client.simulate_post(f"{API}/admin/users/{jane.id}/suspend",
                                     headers=admin.headers, json={})
    assert suspended.status_code == 200

    assert me(client, jane.token).status_code == 401
    refused = login(client, jane.email)
    assert refused.status_code == 403
    assert refused.json["type"] == PROBLEM + "user-not-active"
    # Someone who does not know the password learns nothing about the status.
    assert login(client, jane.email, "Wrong-Password-1").status_code == 401

    client.simulate_post(f"{API}/admin/users/{jane.id}/reactivate", headers=admin.headers,
                         json={})
    assert me(client, jane.token).status_code == 401  # old sessions stay ended
    assert me(client, login_token(client, jane.email)).status_code == 200


def test_a_deactivated_user_cannot_log_in(client, make_user):
    gone = make_user(status="deactivated")

    result = login(client, gone.email)

    assert result.status_code == 403
    assert result.json["type"] == PROBLEM + "user-not-active"
    assert me(client, gone.token).status_code == 401


# -- logout and tokens --------------------------------------------------------------

def test_logout_revokes_only_the_presented_token(client, make_user):
    jane = make_user(via_api=True)
    other_session = login_token(client, jane.email)

    result = client.simulate_post(f"{API}/auth/logout", headers=jane.headers)

    assert result.status_code == 204
    assert me(client, jane.token).status_code == 401
    assert me(client, other_session).status_code == 200
    again = client.simulate_post(f"{API}/auth/logout", headers=jane.headers)
    assert again.status_code == 401
    assert len(audit_rows("auth.logout", jane.id)) == 1


def test_an_expired_token_is_refused(timed_client, clock, settings):
    email = unique_email("expiry")
    register(timed_client, email)
    token = login_token(timed_client, email)
    assert me(timed_client, token).status_code == 200

    clock.advance(seconds=settings.token_ttl + 1)

    result = me(timed_client, token)
    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", [
    None,
    "Bearer",
    "Bearer not-a-token",
    "Basic amFuZTpwYXNzd29yZA==",
    "Bearer hr_" + "A" * 43,  # our shape, never issued
])
def test_missing_or_bad_credentials_are_401_with_www_authenticate(client, header):
    result = client.simulate_get(f"{API}/users/me",
                                 headers={"Authorization": header} if header else None)

    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"].startswith("Bearer")
    assert result.json["type"] == PROBLEM + "unauthorized"
    assert result.json["request_id"] == result.headers["X-Request-ID"]


def test_every_api_route_but_register_login_and_password_reset_needs_a_token(client):
    """Walk the OpenAPI document: each /api/v1 operation without a token is a 401."""
    document = client.simulate_get("/api/openapi.json").json
    public = {("post", f"{API}/auth/register"), ("post", f"{API}/auth/login"),
              ("post", f"{API}/auth/forgot-password"), ("post", f"{API}/auth/reset-password")}
    checked = 0
    for path, operations in document["paths"].items():
        if not path.startswith(API + "/"):
            continue
        concrete = path
        for part in path.split("/"):
            if part.startswith("{"):
                concrete = concrete.replace(part, str(uuid.uuid4()))
        for method, operation in operations.items():
            if (method, path) in public:
                assert "security" not in operation
                continue
            assert operation.get("security") == [{"bearerAuth": []}], (method, path)
            result = client.simulate_request(method.upper(), concrete, json={})
            assert result.status_code == 401, (method, path, result.status_code)
            checked += 1
    assert checked >= 12


def test_a_cors_preflight_needs_no_token(environ, database):
    """Browsers send OPTIONS without credentials; it must not be refused with 401."""
    origin = "https://app.example.com"
    settings = load_settings({**environ, "HOARDRUN_CORS_ORIGINS": origin})
    client = testing.TestClient(create_app(settings))

    result = client.simulate_options(f"{API}/users/me", headers={
        "Origin": origin, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "Authorization"})

    assert result.status_code == 200
    assert result.headers["Access-Control-Allow-Origin"] == origin


def count_statements(monkeypatch, database, request):
    """How many SQL statements ``request()`` ran (ORM and raw alike)."""
    statements = []
    real = database.execute_sql

    def counting(sql, params=None, *args, **kwargs):
        statements.append(sql)
        return real(sql, params, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(database, "execute_sql", counting)
        result = request()
    return statements, result


def test_the_bearer_check_is_one_statement_and_garbage_costs_none(client, database,
                                                                  make_user, monkeypatch):
    """It runs on every request (PERFORMANCE.md): one indexed lookup, nothing for junk."""
    jane = make_user()

    statements, result = count_statements(
        monkeypatch, database, lambda: me(client, jane.token))
    assert result.status_code == 200
    assert len(statements) == 2  # the token (joined with its user), then the profile
    assert "auth_tokens" in statements[0] and "users" in statements[0]

    statements, result = count_statements(
        monkeypatch, database, lambda: me(client, "not-even-shaped-like-a-token"))
    assert result.status_code == 401
    assert statements == []
