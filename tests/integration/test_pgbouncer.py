"""HoardRun behind PgBouncer in ``pool_mode = transaction`` (issue 15 item 3).

A PgBouncer of our own (``tests/integration/pgbouncer.py``) sits in front of
the run's test server with a pool of two server sessions, so the app's
twenty pooled client connections really share them and consecutive
transactions of one client land on different sessions. Through it run:
the money API tests (``test_money_api.py``), the idempotency tests
(``test_idempotency.py``, five threads racing for one key included), the
HTTP race test (``test_http_races.py``, 8 clients x 1,000 movements) and
the round-trip and per-transaction settings tests (``test_round_trips.py``),
all imported here unchanged: only ``database_url`` differs. PgBouncer keeps
its defaults where they matter: a client sending ``options`` is refused, and
a prepared statement lives in one server session only.

Needs Debian's ``pgbouncer`` (``/usr/sbin/pgbouncer``); without it these tests
skip, except with ``CI=true`` (``.ci/run`` installs it), where they fail.
"""

import os

import psycopg2
import pytest

from hoardrun.db import db
from tests.integration.pgbouncer import PgBouncer, PgBouncerUnavailable

from test_http_races import (  # noqa: F401  (collected and run here, through the pooler)
    test_concurrent_transfers_and_payments_keep_the_books_whole,
)
from test_idempotency import *  # noqa: F401,F403
from test_money_api import *  # noqa: F401,F403
from test_round_trips import (  # noqa: F401
    one_second_timeout, sent, test_a_keyed_transfer_costs_three_round_trips,
    test_every_transaction_carries_utc_and_the_statement_timeout,
    test_savepoints_still_undo_only_their_part,
)

pytestmark = pytest.mark.slow
POOL_SIZE = 2


@pytest.fixture(scope="module")
def pgbouncer(migrated_postgres):
    """PgBouncer (transaction mode, 2 server sessions) in front of the test database."""
    url, _ = migrated_postgres
    try:
        bouncer = PgBouncer(url, pool_size=POOL_SIZE)
    except PgBouncerUnavailable as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{error}: CI must install it (.ci/run does)")
        pytest.skip(str(error))
    with bouncer:
        yield bouncer


@pytest.fixture
def database_url(database_url, pgbouncer):
    """This test's clean database (emptied directly), reached through PgBouncer."""
    return pgbouncer.url()


def _hold_a_session(pgbouncer):
    """A connection through the pooler inside a transaction: it pins one server session."""
    conn = psycopg2.connect(pgbouncer.url(), sslmode="disable")
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    return conn, cur.fetchone()[0]


def test_one_client_connection_is_served_by_several_server_sessions(database, make_user,
                                                                   client, pgbouncer):
    """The premise: a pinned session sends our next transaction to another one, which works."""
    person = make_user()
    first = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    holder, pinned = _hold_a_session(pgbouncer)  # the session we just left (LIFO reuse)
    try:
        assert pinned == first
        assert db.execute_sql("SELECT pg_backend_pid()").fetchone()[0] != first
        # Bearer lookup, account, deposit: all on the other session.
        result = client.simulate_post("/api/v1/accounts", headers=person.headers,
                                      json={"type": "checking", "currency": "USD",
                                            "name": "Pooled"})
        assert result.status_code == 201, result.text
        deposit = client.simulate_post(f"/api/v1/accounts/{result.json['id']}/deposits",
                                       headers={**person.headers, "Idempotency-Key": "p1"},
                                       json={"amount": "5.00"})
        assert deposit.status_code == 201, deposit.text
    finally:
        holder.close()


def test_requests_leave_nothing_in_any_server_session(client, make_user, pgbouncer):
    """No prepared statement, setting, temporary table, listener or advisory lock stays."""
    person = make_user()
    account = client.simulate_post("/api/v1/accounts", headers=person.headers,
                                   json={"type": "checking", "currency": "USD", "name": "A"})
    for n in range(10):
        result = client.simulate_post(f"/api/v1/accounts/{account.json['id']}/deposits",
                                      headers={**person.headers, "Idempotency-Key": f"k{n}"},
                                      json={"amount": "1.00"})
        assert result.status_code == 201, result.text
        assert client.simulate_get("/api/v1/users/me", headers=person.headers).status_code == 200
    # Pin every server session of the pool in turn and look inside each one.
    holders = [psycopg2.connect(pgbouncer.url(), sslmode="disable") for _ in range(POOL_SIZE)]
    try:
        seen = {}
        for conn in holders:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_backend_pid(),"
                    " (SELECT count(*) FROM pg_prepared_statements),"
                    " (SELECT array_agg(name ORDER BY name) FROM pg_settings"
                    "   WHERE source = 'session' AND name <> 'application_name'),"
                    " pg_my_temp_schema() <> 0,"
                    " (SELECT count(*) FROM pg_listening_channels()),"
                    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    "   AND pid = pg_backend_pid())")
                pid, *state = cur.fetchone()
            seen[pid] = state
        assert len(seen) == POOL_SIZE
        assert all(state == [0, None, False, 0, 0] for state in seen.values()), seen
    finally:
        for conn in holders:
            conn.close()
