"""Email ownership through HTTP, with a real SMTP server on loopback (aiosmtpd).

Codes and reset tokens are read from the messages that server received,
exactly as a user reads them from their mailbox; the clock is pinned
(``create_app(clock=)``) to walk past expiries.
"""

import re
import statistics
import time

import pytest
from falcon import testing

import helpers
from hoardrun import auth, mail
from hoardrun.api import create_app
from hoardrun.config import load_settings
from hoardrun.db import db
from hoardrun.mail import Mailer
from hoardrun.models import MailOutbox, User
from money_helpers import audit_rows, deposit, ok, open_account, post_money, problem
from tests.integration.smtp_server import SmtpServer

API = "/api/v1"
NEW_PASSWORD = "Quartz-Harbour-88"
CODE = re.compile(r"\b(\d{6})\b")
RESET_TOKEN = re.compile(r"\bhrr_[A-Za-z0-9_-]{43}\b")


@pytest.fixture
def smtp(tmp_path):
    with SmtpServer(tmp_path) as server:
        yield server


def _mail_client(environ, server, clock):
    settings = load_settings({**environ, **server.environ(),
                              "HOARDRUN_TOKEN_TTL": str(30 * 86400)})
    mailer = Mailer.from_settings(settings)
    return testing.TestClient(create_app(settings, clock=clock, mailer=mailer)), mailer


@pytest.fixture
def api(environ, database, smtp, clock):
    """A test client whose app sends mail to ``smtp`` and runs on ``clock``."""
    client, mailer = _mail_client(environ, smtp, clock)
    client.mailer = mailer
    yield client
    mailer.close()


def code_from(message):
    return CODE.search(message.get_content()).group(1)


def token_from(message):
    return RESET_TOKEN.search(message.get_content()).group(0)


def signup(api, smtp, email=None):
    """Register and log in through the API; return (Person, the mailed code)."""
    email = email or helpers.unique_email("jane")
    ok(helpers.register(api, email), 201)
    person = helpers.Person(id=None, email=email, password=helpers.PASSWORD,
                            token=helpers.login_token(api, email))
    person.id = ok(api.simulate_get(f"{API}/users/me", headers=person.headers), 200)["id"]
    return person, code_from(smtp.wait_for(email))


def verify(api, person, code):
    return api.simulate_post(f"{API}/auth/verify-email", headers=person.headers,
                             json={"code": code})


def resend(api, person):
    return api.simulate_post(f"{API}/auth/resend-verification", headers=person.headers)


def forgot(api, email):
    return api.simulate_post(f"{API}/auth/forgot-password", json={"email": email})


def reset(api, token, password=NEW_PASSWORD):
    return api.simulate_post(f"{API}/auth/reset-password",
                             json={"token": token, "new_password": password})


def pay_email(api, payer, email, amount="5.00"):
    return post_money(api, payer, "/p2p", {"recipient_email": email, "amount": amount})


def funded(api):
    payer = helpers.make_user(api)
    account = open_account(api, payer)
    deposit(api, payer, account["id"], "100.00")
    return payer


def wrong(code):
    return f"{(int(code) + 1) % 10**6:06d}"


# --------------------------------------------------------------------------
# Verification


def test_register_mails_a_code_over_starttls_and_only_a_verified_address_is_paid(api, smtp):
    payer = funded(api)
    jane, code = signup(api, smtp)
    open_account(api, jane)
    message = smtp.received(jane.email)[0]
    assert message["From"] == "HoardRun <no-reply@hoardrun.test>"
    assert "verification code" in message["Subject"]
    assert smtp.sessions() == [(True, True)]  # logged in, over STARTTLS

    me = ok(api.simulate_get(f"{API}/users/me", headers=jane.headers), 200)
    assert me["email_verified"] is False
    problem(pay_email(api, payer, jane.email), 404, "not-found")

    verified = ok(verify(api, jane, code), 200)

    assert verified["email_verified"] is True and verified["email"] == jane.email
    ok(pay_email(api, payer, jane.email), 201)
    [row] = audit_rows("user.email_verify", jane.id)
    assert row.actor_id is not None
    assert User.get_by_id(jane.id).email_verified


# aiosmtpd warns about AUTH without STARTTLS; on this socket TLS comes first.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtps_delivers_with_implicit_tls(environ, database, tmp_path, clock):
    with SmtpServer(tmp_path, implicit_tls=True) as server:
        client, mailer = _mail_client(environ, server, clock)
        try:
            email = helpers.unique_email("tls")
            ok(helpers.register(client, email), 201)
            message = server.wait_for(email)
        finally:
            mailer.close()
    assert CODE.search(message.get_content())
    # Authenticated; that socket speaks nothing but TLS (aiosmtpd flags only STARTTLS).
    assert [authenticated for authenticated, _ in server.sessions()] == [True]


def test_a_code_expires_after_24_hours_and_a_new_one_works(api, smtp, clock):
    jane, code = signup(api, smtp)
    clock.advance(hours=24, seconds=1)

    problem(verify(api, jane, code), 422, "invalid-code")

    assert ok(resend(api, jane), 202)["email"] == jane.email
    fresh = code_from(smtp.wait_for(jane.email, count=2))
    assert ok(verify(api, jane, fresh), 200)["email_verified"] is True


def test_a_code_works_once(api, smtp):
    jane, code = signup(api, smtp)
    ok(verify(api, jane, code), 200)

    again = problem(verify(api, jane, code), 409, "conflict")

    assert "already verified" in again["detail"]
    problem(resend(api, jane), 409, "conflict")


def test_wrong_codes_count_down_and_the_last_spends_the_code(api, smtp, clock):
    jane, code = signup(api, smtp)
    details = [problem(verify(api, jane, wrong(code)), 422, "invalid-code")["detail"]
               for _ in range(5)]

    assert details[:4] == ["wrong code; 4 tries left", "wrong code; 3 tries left",
                           "wrong code; 2 tries left", "wrong code; 1 try left"]
    assert "last try" in details[4]
    # Even the right code is refused now: five guesses was the budget.
    problem(verify(api, jane, code), 422, "invalid-code")
    assert not User.get_by_id(jane.id).email_verified

    clock.advance(seconds=61)
    ok(resend(api, jane), 202)
    ok(verify(api, jane, code_from(smtp.wait_for(jane.email, count=2))), 200)


def test_only_the_newest_code_counts_and_resending_is_rate_limited(api, smtp, clock):
    jane, first = signup(api, smtp)

    too_soon = resend(api, jane)
    problem(too_soon, 429, "too-many-attempts")
    assert 1 <= int(too_soon.headers["Retry-After"]) <= 60

    for count in range(2, 6):
        clock.advance(seconds=61)
        ok(resend(api, jane), 202)
        smtp.wait_for(jane.email, count=count)
    clock.advance(seconds=61)
    hourly = resend(api, jane)
    problem(hourly, 429, "too-many-attempts")  # five codes within the hour
    assert int(hourly.headers["Retry-After"]) > 60

    problem(verify(api, jane, first), 422, "invalid-code")  # replaced by later codes
    newest = code_from(smtp.received(jane.email)[-1])
    ok(verify(api, jane, newest), 200)


def test_a_squatters_unverified_address_is_refused_exactly_like_an_unknown_one(api, smtp):
    payer = funded(api)
    squatter, _ = signup(api, smtp, "landlord@example.com")
    open_account(api, squatter)

    to_squatter = pay_email(api, payer, "landlord@example.com")
    to_nobody = pay_email(api, payer, "nobody-at-all@example.com")
    by_id = post_money(api, payer, "/p2p", {"recipient_user_id": squatter.id,
                                            "amount": "5.00"})

    assert to_squatter.status_code == to_nobody.status_code == by_id.status_code == 404
    def same(body):
        return {k: v for k, v in body.items() if k != "request_id"}
    assert same(to_squatter.json) == same(to_nobody.json) == same(by_id.json)
    assert to_squatter.headers["content-type"] == to_nobody.headers["content-type"]


def test_an_unverified_user_may_deposit_but_not_send(api, smtp):
    jane, _ = signup(api, smtp)
    account = open_account(api, jane)
    deposit(api, jane, account["id"], "50.00")
    friend = helpers.make_user(api)
    open_account(api, friend)

    refused = problem(pay_email(api, jane, friend.email), 403, "email-not-verified")
    nobody = problem(pay_email(api, jane, "nobody-at-all@example.com"), 403,
                     "email-not-verified")
    assert refused["detail"] == nobody["detail"]  # and it tells nothing about the recipient


def test_a_new_email_counts_only_once_verified(api, smtp):
    payer = funded(api)
    jane = helpers.make_user(api)
    open_account(api, jane)
    new = helpers.unique_email("moved")

    patched = ok(api.simulate_patch(f"{API}/users/me", headers=jane.headers,
                                    json={"email": new, "first_name": "Janet"}), 200)

    assert (patched["email"], patched["pending_email"]) == (jane.email, new)
    assert patched["first_name"] == "Janet" and patched["email_verified"] is True
    problem(pay_email(api, payer, new), 404, "not-found")
    ok(pay_email(api, payer, jane.email), 201)  # the old address is still the account's

    done = ok(verify(api, jane, code_from(smtp.wait_for(new))), 200)

    assert (done["email"], done["pending_email"], done["email_verified"]) == (new, None, True)
    ok(pay_email(api, payer, new), 201)
    problem(pay_email(api, payer, jane.email), 404, "not-found")
    assert "changed" in smtp.wait_for(jane.email)["Subject"]  # the old address is told
    problem(verify(api, jane, code_from(smtp.received(new)[0])), 409, "conflict")
    assert helpers.login(api, new).status_code == 200


def test_changing_to_a_taken_email_is_a_conflict(api, smtp):
    jane, other = helpers.make_user(api), helpers.make_user(api)

    result = api.simulate_patch(f"{API}/users/me", headers=jane.headers,
                                json={"email": other.email.upper()})

    problem(result, 409, "conflict")
    assert User.get_by_id(jane.id).pending_email is None


# --------------------------------------------------------------------------
# Password reset


def _verified(api, smtp):
    person, code = signup(api, smtp)
    ok(verify(api, person, code), 200)
    return person


def test_the_whole_reset_flow_revokes_sessions_and_is_audited(api, smtp):
    jane = _verified(api, smtp)
    other_device = helpers.login_token(api, jane.email)

    accepted = forgot(api, jane.email)

    assert accepted.status_code == 202
    token = token_from(smtp.wait_for(jane.email, count=2))
    assert reset(api, token).status_code == 204
    for old in (jane.token, other_device):
        assert api.simulate_get(f"{API}/users/me", headers=helpers.bearer(old)).status_code == 401
    assert helpers.login(api, jane.email).status_code == 401
    assert helpers.login(api, jane.email, NEW_PASSWORD).status_code == 200
    [row] = audit_rows("user.password_reset", jane.id)
    assert '"tokens_revoked": 2' in row.after
    assert "password was changed" in smtp.wait_for(jane.email, count=3)["Subject"]

    used = problem(reset(api, token, "Another-Pass-99"), 422, "invalid-code")
    assert used["errors"][0]["field"] == "token"
    assert helpers.login(api, jane.email, NEW_PASSWORD).status_code == 200


def test_a_reset_token_expires(api, smtp, clock):
    jane = _verified(api, smtp)
    forgot(api, jane.email)
    token = token_from(smtp.wait_for(jane.email, count=2))
    clock.advance(hours=1, seconds=1)

    problem(reset(api, token), 422, "invalid-code")
    assert helpers.login(api, jane.email).status_code == 200


def test_a_weak_password_is_refused_and_the_token_survives(api, smtp):
    jane = _verified(api, smtp)
    forgot(api, jane.email)
    token = token_from(smtp.wait_for(jane.email, count=2))

    weak = problem(reset(api, token, "short"), 422, "validation-error")

    assert weak["errors"][0]["field"] == "new_password"
    assert reset(api, token).status_code == 204


def test_a_locked_out_user_can_still_reset_and_log_in_at_once(api, smtp):
    jane = _verified(api, smtp)
    for _ in range(5):
        helpers.login(api, jane.email, "Wrong-password-1")
    problem(helpers.login(api, jane.email), 429, "too-many-attempts")

    assert forgot(api, jane.email).status_code == 202
    assert reset(api, token_from(smtp.wait_for(jane.email, count=2))).status_code == 204

    assert helpers.login(api, jane.email, NEW_PASSWORD).status_code == 200


def test_someone_asking_for_many_resets_cannot_cancel_the_users_link(api, smtp):
    jane = _verified(api, smtp)
    for _ in range(8):
        assert forgot(api, jane.email).status_code == 202
    first = token_from(smtp.wait_for(jane.email, count=2))
    smtp.wait_for(jane.email, count=6)
    time.sleep(0.5)

    # At most five an hour reach the mailbox, and the oldest still works.
    assert len(smtp.received(jane.email)) == 1 + 5
    assert reset(api, first).status_code == 204


def _timed(api, email):
    started = time.perf_counter()
    result = forgot(api, email)
    return result, time.perf_counter() - started


def test_forgot_password_looks_the_same_for_known_and_unknown_addresses(api, smtp):
    jane = _verified(api, smtp)
    unverified, _ = signup(api, smtp)
    known, unknown = [], []
    answers = set()
    for i in range(24):
        # Fresh known users keep every request under the hourly cap.
        if i % 4 == 0:
            target = _verified(api, smtp).email
        for email, times in ((target, known), (f"nobody-{i}@example.com", unknown)):
            result, seconds = _timed(api, email)
            times.append(seconds)
            answers.add((result.status_code, result.text, result.headers["content-type"]))
    for email in (jane.email, unverified.email, "JANE@" + jane.email.split("@")[1]):
        result, _ = _timed(api, email)
        answers.add((result.status_code, result.text, result.headers["content-type"]))

    assert len(answers) == 1, answers
    assert next(iter(answers))[0] == 202
    fast, slow = sorted([statistics.median(known), statistics.median(unknown)])
    assert slow - fast < max(0.005, 0.5 * fast), (known, unknown)
    # Only verified addresses get a token.
    smtp.wait_for(jane.email, count=2)
    time.sleep(0.5)
    assert len(smtp.received(unverified.email)) == 1
    assert len(smtp.received(jane.email)) == 2


# --------------------------------------------------------------------------
# Delivery


def test_a_refused_delivery_is_retried_and_never_fails_the_request(api, smtp):
    smtp.refuse = True
    email = helpers.unique_email("later")

    ok(helpers.register(api, email), 201)

    deadline = time.monotonic() + 10
    while smtp.refused == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    [row] = MailOutbox.select().where(MailOutbox.recipient == email)
    assert (row.status, row.attempts) == ("pending", 1)
    assert "451" in row.last_error and row.next_attempt_at > auth.utcnow()
    assert row.body is not None and "verification code" not in row.body  # encrypted

    smtp.refuse = False
    db.execute_sql("UPDATE mail_outbox SET next_attempt_at = now()")  # the backoff is over
    api.mailer.wake()

    assert CODE.search(smtp.wait_for(email).get_content())
    deadline = time.monotonic() + 5
    while MailOutbox.get_by_id(row.id).status != "sent" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert MailOutbox.get_by_id(row.id).attempts == 2


def test_a_dead_mail_server_costs_the_user_nothing(environ, database, tmp_path, clock):
    nothing_listens = SmtpServer(tmp_path)  # never started: its port is closed
    client, mailer = _mail_client(environ, nothing_listens, clock)
    try:
        email = helpers.unique_email("down")
        assert helpers.register(client, email).status_code == 201
        jane = helpers.make_user(client)
        assert forgot(client, jane.email).status_code == 202
        deadline = time.monotonic() + 10
        while (MailOutbox.select().where(MailOutbox.last_error.is_null(False)).count() < 2
               and time.monotonic() < deadline):
            time.sleep(0.05)
    finally:
        mailer.close()
    rows = list(MailOutbox.select())
    assert len(rows) == 2
    assert all(r.status == "pending" and "Connection" in r.last_error for r in rows), [
        r.last_error for r in rows]


def test_the_development_outbox_logs_the_message_and_keeps_it(client, settings, caplog):
    email = helpers.unique_email("dev")
    with caplog.at_level("INFO", logger="hoardrun.mail"):
        ok(helpers.register(client, email), 201)
        deadline = time.monotonic() + 10
        while (not MailOutbox.select().where((MailOutbox.recipient == email)
                                             & (MailOutbox.status == "sent")).exists()
               and time.monotonic() < deadline):
            time.sleep(0.05)

    [row] = mail.outbox(1)
    assert (row["recipient"], row["status"]) == (email, "sent")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"To: {email}" in logged
    code = CODE.search(logged).group(1)
    assert code in Mailer.from_settings(settings).open(row["body"])


# --------------------------------------------------------------------------
# OpenAPI and bad input


def test_the_new_routes_are_documented(api):
    paths = api.simulate_get("/api/openapi.json").json["paths"]

    for route, public, statuses in [
        ("verify-email", False, {"200", "401", "409", "422"}),
        ("resend-verification", False, {"202", "401", "409", "429"}),
        ("forgot-password", True, {"202", "422"}),
        ("reset-password", True, {"204", "422"}),
    ]:
        operation = paths[f"{API}/auth/{route}"]["post"]
        assert ("security" not in operation) is public, route
        assert statuses <= set(operation["responses"]), (route, operation["responses"])
    me = paths[f"{API}/users/me"]["patch"]
    assert {"409", "429"} <= set(me["responses"])


BAD = [
    ("verify-email", {}, 422, "validation-error"),
    ("verify-email", {"code": 123456}, 422, "validation-error"),
    ("verify-email", {"code": "12345"}, 422, "validation-error"),
    ("verify-email", {"code": "12345a"}, 422, "validation-error"),
    ("verify-email", {"code": "١٢٣٤٥٦"}, 422, "validation-error"),  # Arabic-Indic digits
    ("verify-email", {"code": "123456", "extra": 1}, 422, "validation-error"),
    ("verify-email", {"code": "1" * 17}, 422, "validation-error"),
    ("forgot-password", {}, 422, "validation-error"),
    ("forgot-password", {"email": 7}, 422, "validation-error"),
    ("forgot-password", {"email": "not-an-email"}, 422, "validation-error"),
    ("forgot-password", {"email": "a@b.co", "admin": True}, 422, "validation-error"),
    ("forgot-password", {"email": "x" * 250 + "@b.co"}, 422, "validation-error"),
    ("forgot-password", {"email": "nul\u0000@example.com"}, 422, "validation-error"),
    ("reset-password", {}, 422, "validation-error"),
    ("reset-password", {"token": "hrr_x"}, 422, "validation-error"),
    ("reset-password", {"token": "garbage", "new_password": NEW_PASSWORD}, 422,
     "invalid-code"),
    ("reset-password", {"token": "hrr_" + "A" * 43, "new_password": NEW_PASSWORD}, 422,
     "invalid-code"),
    ("reset-password", {"token": ["hrr_"], "new_password": NEW_PASSWORD}, 422,
     "validation-error"),
    ("reset-password", {"token": "t" * 129, "new_password": NEW_PASSWORD}, 422,
     "validation-error"),
]


@pytest.mark.parametrize("route, body, status, code", BAD,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_input_is_a_problem_and_changes_nothing(api, smtp, route, body, status, code):
    jane = helpers.make_user(api, verified=False)

    result = api.simulate_post(f"{API}/auth/{route}", headers=jane.headers, json=body)

    problem(result, status, code)
    assert not User.get_by_id(jane.id).email_verified
    assert MailOutbox.select().count() == 0


@pytest.mark.parametrize("route", ["verify-email", "resend-verification"])
def test_the_verification_routes_need_a_token(api, route):
    problem(api.simulate_post(f"{API}/auth/{route}", json={"code": "123456"}), 401,
            "unauthorized")


def test_a_non_json_body_is_refused(api):
    for route in ("forgot-password", "reset-password"):
        result = api.simulate_post(f"{API}/auth/{route}", body="email=a@b.co",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert result.status_code in (415, 422), (route, result.status_code)


@pytest.mark.parametrize("body", [{"email": None}, {"email": "not-an-email"},
                                  {"email": 42}])
def test_patch_email_bad_values_are_422(api, body):
    jane = helpers.make_user(api)

    result = api.simulate_patch(f"{API}/users/me", headers=jane.headers, json=body)

    assert result.status_code == 422, result.text
    assert User.get_by_id(jane.id).pending_email is None
