"""The database fails under a running server: outages, pool exhaustion, slow and killed sessions.

Each test serves the real app under waitress (``LiveServer``) against a
PostgreSQL server of its own (``PgInstance``: initdb into /tmp, a free
loopback port), so it can stop, start and kill sessions without touching the
shared server. What a client must see: a clean ``application/problem+json``
503 with ``Retry-After`` (never a 500, never a hang: every client call has a
bounded socket timeout), readiness ``not_ready`` while the database is away,
and, once it is back, success on the same app without a restart, with books
that balance and every acknowledged transfer in them.

"""

import http.client
import itertools
import json
import queue
import threading
import time
import uuid
from contextlib import contextmanager

import pytest

import helpers
from hoardrun import accounts, errors, ledger, schema
from hoardrun import db as dbm
from hoardrun.api import create_app
from hoardrun.config import load_settings
from hoardrun.models import Account, Transfer
from tests.conftest import base_environ
from tests.integration.conftest import LiveServer
from tests.integration.pg_instance import PgInstance, wait_until

pytestmark = pytest.mark.slow

API = "/api/v1"
PROBLEM_JSON = "application/problem+json"
UNAVAILABLE_TYPE = "https://hoardrun.dev/problems/" + errors.DatabaseUnavailable.code
# Every client call gives up after this long: a hang fails the test instead of stalling it.
CLIENT_TIMEOUT = 20
OPENING_BALANCE = 1_000_000  # minor units on each of the two accounts


# ---------------------------------------------------------------------------
# The throwaway server, its database and the app served on it


@pytest.fixture(scope="module")
def pg():
    """A PostgreSQL server of this module's own (stopped and deleted afterwards)."""
    with PgInstance() as instance:
        yield instance


@pytest.fixture(scope="module")
def pg_migrated(pg):
    """The ``hoardrun`` database on ``pg``, built by the real migrations once."""
    url = pg.create_database("hoardrun")
    database = dbm.init_db(load_settings(base_environ(url)))
    try:
        schema.migrate(database)
        tables = [t for t in database.get_tables() if t != schema.MIGRATE_TABLE]
    finally:
        database.close_all()
    return url, tables


@pytest.fixture
def pg_url(pg, pg_migrated):
    """The migrated database, emptied, on a running server (a failed test may have stopped it)."""
    if not pg.running:
        pg.start()
    url, tables = pg_migrated
    pg.sql("TRUNCATE {} CASCADE".format(", ".join(f'"{t}"' for t in tables)),
           database="hoardrun")
    return url


class Probe:
    """Test-only routes (outside /api/v1, so no token): hold, stall or report a connection.

    ``GET /test/hold`` runs one statement, so it holds a pooled connection,
    then waits for ``release``; ``/test/pid`` answers its session's backend pid
    (``?wait=1``: publishes the pid on ``pids``, waits for ``release``, then
    runs one more statement on the same session); ``/test/sleep?seconds=S``
    runs ``pg_sleep(S)``.
    """

    def __init__(self):
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.pids = queue.Queue()

    def mount(self, app):
        app.add_route("/test/hold", _Hold(self))
        app.add_route("/test/pid", _Pid(self))
        app.add_route("/test/sleep", _Sleep())


class _Hold:
    def __init__(self, probe):
        self.probe = probe

    def on_get(self, req, resp):
        dbm.db.execute_sql("SELECT 1").fetchone()
        self.probe.entered.release()
        resp.media = {"released": self.probe.release.wait(CLIENT_TIMEOUT)}


class _Pid:
    def __init__(self, probe):
        self.probe = probe

    def on_get(self, req, resp):
        pid = dbm.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        if req.get_param_as_bool("wait"):
            self.probe.pids.put(pid)
            self.probe.release.wait(CLIENT_TIMEOUT)
            dbm.db.execute_sql("SELECT 1").fetchone()
        resp.media = {"pid": pid}


class _Sleep:
    def on_get(self, req, resp):
        seconds = req.get_param_as_float("seconds", required=True)
        dbm.db.execute_sql("SELECT pg_sleep(%s)", (seconds,)).fetchone()
        resp.media = {"slept": seconds}


@contextmanager
def served(url, *, threads=8, **env):
    """The real app (plus ``Probe`` routes) for ``url`` under waitress; yields (server, probe)."""
    settings = load_settings(base_environ(url, DATABASE_CONNECT_TIMEOUT="3", **env))
    database = dbm.init_db(settings)
    probe = Probe()
    app = create_app(settings)
    probe.mount(app)
    try:
        with LiveServer(app, settings, threads=threads) as server:
            yield server, probe
    finally:
        probe.release.set()
        database.close_all()


# ---------------------------------------------------------------------------
# HTTP and data helpers


class Reply:
    """One HTTP answer: status, headers (lower-case names), parsed JSON body."""

    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    @property
    def content_type(self):
        return self.headers.get("content-type", "")

    def __repr__(self):
        return f"<{self.status} {self.content_type} {self.body!r:.300}>"


def call(server, method, path, body=None, *, headers=None, conn=None):
    """One request over a real socket (keep-alive when ``conn`` is given)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT)
    headers = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    started = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        names = {k.lower(): v for k, v in resp.getheaders()}
        parsed = json.loads(raw) if raw and "json" in names.get("content-type", "") else raw
        return Reply(resp.status, names, parsed, time.monotonic() - started)
    finally:
        if own:
            conn.close()


def assert_unavailable_problem(reply):
    """A 503 a client can act on: problem+json, the database type, Retry-After, no internals."""
    assert reply.status == 503, reply
    assert reply.content_type == PROBLEM_JSON, reply
    assert reply.body["type"] == UNAVAILABLE_TYPE, reply
    assert reply.body["status"] == 503
    assert int(reply.headers["retry-after"]) > 0
    text = json.dumps(reply.body).lower()
    assert "traceback" not in text and "select" not in text and "psycopg" not in text, reply


def funded_user():
    """An active user with a token and two USD accounts holding OPENING_BALANCE each."""
    person = helpers.make_user()
    first = accounts.open_account(person.id, "checking", "USD", "Everyday")
    second = accounts.open_account(person.id, "savings", "USD", "Savings")
    for account in (first, second):
        ledger.deposit(account.id, OPENING_BALANCE)
    # The test thread gives its connection back: only the server's threads use the pool.
    dbm.release_connection()
    return person, str(first.id), str(second.id)


def transfer_body(source, target, amount="1.00"):
    return {"from_account_id": source, "to_account_id": target, "amount": amount}


def assert_books_whole(person, account_ids, acknowledged):
    """No partial movement, nothing created or lost, every 201 transfer in the books."""
    assert ledger.verify() == []
    balances = [Account.get_by_id(a).balance for a in account_ids]
    assert sum(balances) == OPENING_BALANCE * len(account_ids)
    stored = {str(t.id): t.status for t in Transfer.select().where(Transfer.user == person.id)}
    missing = set(acknowledged) - set(stored)
    assert not missing, f"{len(missing)} acknowledged transfer(s) are not in the books"
    assert set(stored[t] for t in acknowledged) <= {"completed"}
    dbm.release_connection()


# ---------------------------------------------------------------------------
# The database goes away under load and comes back


class Phases:
    """The test's phase, read by client threads at the start and end of each request."""

    def __init__(self):
        self.name = "up"

    def set(self, name):
        self.name = name


def test_an_outage_under_load_is_503_then_recovers_without_restarting_the_app(pg, pg_url):
    with served(pg_url) as (server, _):
        person, first, second = funded_user()
        auth = person.headers
        operations = {
            # kind: (method, path, body factory)
            "transfer": lambda n: ("POST", f"{API}/transfers",
                                   transfer_body(*((first, second) if n % 2 else (second, first)))),
            "account": lambda n: ("GET", f"{API}/accounts/{first}", None),
            "database": lambda n: ("GET", "/api/health/database", None),
            "readiness": lambda n: ("GET", "/api/health/readiness", None),
            "basic": lambda n: ("GET", "/api/health/", None),
        }
        kinds = list(operations)
        phases = Phases()
        results, failures = [], []
        lock = threading.Lock()
        done = threading.Event()

        def client(offset):
            conn = None
            for n in itertools.count(offset):
                if done.is_set():
                    break
                kind = kinds[n % len(kinds)]
                method, path, body = operations[kind](n)
                headers = {}
                if kind in ("transfer", "account"):
                    headers = dict(auth)
                if kind == "transfer":
                    headers["Idempotency-Key"] = uuid.uuid4().hex
                conn = conn or http.client.HTTPConnection(server.host, server.port,
                                                          timeout=CLIENT_TIMEOUT)
                started = phases.name
                try:
                    reply = call(server, method, path, body, headers=headers, conn=conn)
                except Exception as exc:  # a hang or dropped connection: reported below
                    with lock:
                        failures.append((kind, started, repr(exc)))
                    conn.close()
                    conn = None
                    continue
                with lock:
                    results.append((kind, started, phases.name, reply))
            if conn is not None:
                conn.close()

        def seen(phase, each=8):
            """At least ``each`` answers of every kind that started and ended in ``phase``."""
            with lock:
                counts = {k: 0 for k in kinds}
                for kind, start, end, _ in results:
                    if start == end == phase:
                        counts[kind] += 1
            return min(counts.values()) >= each

        def basic_said_down():
            with lock:
                return any(kind == "basic" and start == end == "down"
                           and reply.body["database_healthy"] is False
                           for kind, start, end, reply in results)

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for worker in workers:
            worker.start()
        try:
            assert wait_until(lambda: seen("up"), timeout=60), "no steady traffic before the outage"
            phases.set("stopping")
            pg.stop()
            phases.set("down")
            # The basic probe may reuse a 1 s old answer: wait until it, too, says down.
            assert wait_until(lambda: seen("down") and basic_said_down(), timeout=60), \
                "clients stalled during the outage"
            phases.set("starting")
            pg.start()
            phases.set("back")
            assert wait_until(lambda: seen("back"), timeout=60), "clients stalled after the outage"
        finally:
            done.set()
            for worker in workers:
                worker.join(CLIENT_TIMEOUT + 5)
        assert not failures, failures[:5]

        acknowledged = []
        for kind, start, end, reply in results:
            # Never a 500 or any other failure: answers are planned, whatever the phase.
            assert reply.status in (200, 201, 503), (kind, start, end, reply)
            if reply.status == 503:
                assert int(reply.headers["retry-after"]) > 0, (kind, reply)
                if kind in ("transfer", "account"):
                    assert_unavailable_problem(reply)
            if kind == "transfer" and reply.status == 201:
                acknowledged.append(reply.body["id"])
            if start != end:
                continue  # it straddled a change: either answer is right
            if start in ("up", "back"):
                # Including the very first requests after the server is back:
                # dead pooled connections are never handed out again.
                expected = {"transfer": 201, "basic": 200}.get(kind, 200)
                assert reply.status == expected, (kind, start, reply)
                if kind == "readiness":
                    assert reply.body["status"] == "ready"
                if kind == "database":
                    assert reply.body["database"]["connection_healthy"] is True
            elif start == "down":
                if kind in ("transfer", "account"):
                    assert_unavailable_problem(reply)
                elif kind == "database":
                    assert reply.status == 503, reply
                    assert reply.body["status"] == "unhealthy"
                    assert reply.body["database"]["connection_healthy"] is False
                elif kind == "readiness":
                    assert reply.status == 503, reply
                    assert reply.body["status"] == "not_ready"
                    assert reply.body["failed"][0] == "database"
                else:  # the basic probe is always 200; it may reuse a 1 s old answer
                    assert reply.status == 200, reply
        assert wait_until(lambda: call(server, "GET", "/api/health/").body["database_healthy"],
                          timeout=10)

        assert_books_whole(person, (first, second), acknowledged)
        # the money routes really ran on both sides of the outage
        assert sum(1 for k, s, e, r in results if k == "transfer" and s == e == "back"
                   and r.status == 201) >= 8


# ---------------------------------------------------------------------------
# More concurrent requests than the pool holds


def test_an_exhausted_pool_answers_503_after_the_pool_timeout_then_recovers(pg_url):
    env = {"DATABASE_POOL_SIZE": "2", "DATABASE_MAX_OVERFLOW": "0", "DATABASE_POOL_TIMEOUT": "1"}
    with served(pg_url, threads=6, **env) as (server, probe):
        person, first, second = funded_user()
        holders, held = [], []

        def hold():
            held.append(call(server, "GET", "/test/hold"))

        for _ in range(2):
            holders.append(threading.Thread(target=hold, daemon=True))
            holders[-1].start()
        for _ in range(2):
            assert probe.entered.acquire(timeout=CLIENT_TIMEOUT), "holders never got a connection"
        try:
            # Both pooled connections are busy: a user's request waits for the
            # pool timeout (1 s), then gets a 503 it can retry, not a hang.
            reply = call(server, "GET", f"{API}/accounts", headers=person.headers)
            assert_unavailable_problem(reply)
            assert reply.elapsed >= 1.0
            reply = call(server, "POST", f"{API}/transfers", transfer_body(first, second),
                         headers=person.headers)
            assert_unavailable_problem(reply)
            health = call(server, "GET", "/api/health/database")
            assert health.status == 503
            assert health.body["database"]["pool_info"]["checked_out"] == 2
            assert call(server, "GET", "/api/health/liveness").status == 200
        finally:
            probe.release.set()
            for thread in holders:
                thread.join(CLIENT_TIMEOUT + 5)
        assert [(r.status, r.body) for r in held] == [(200, {"released": True})] * 2

        reply = call(server, "GET", f"{API}/accounts", headers=person.headers)
        assert reply.status == 200, reply
        reply = call(server, "POST", f"{API}/transfers", transfer_body(first, second),
                     headers=person.headers)
        assert reply.status == 201, reply
        assert_books_whole(person, (first, second), [reply.body["id"]])
        # the refused transfer moved nothing: only the one that was accepted
        assert Account.get_by_id(first).balance == OPENING_BALANCE - 100
        dbm.release_connection()


# ---------------------------------------------------------------------------
# A slow statement and sessions killed by the server


def test_the_command_timeout_cancels_a_slow_statement_and_the_session_stays_usable(pg, pg_url):
    with served(pg_url, threads=4, DATABASE_COMMAND_TIMEOUT="1") as (server, _):
        pid = call(server, "GET", "/test/pid").body["pid"]
        reply = call(server, "GET", "/test/sleep?seconds=5")
        # Cancelled by the server after 1 s: had it run to the end this would be a 200.
        assert_unavailable_problem(reply)
        assert reply.elapsed >= 1.0
        running = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep%%' "
                         "AND state = 'active' AND pid <> pg_backend_pid()")[0][0]
        assert running == 0
        # the session itself survived the cancel and is reused as it is
        assert call(server, "GET", "/test/pid").body["pid"] == pid
        assert call(server, "GET", "/test/sleep?seconds=0.01").status == 200


def test_a_session_killed_mid_request_fails_that_request_cleanly_and_is_not_reused(pg, pg_url):
    with served(pg_url, threads=4) as (server, probe):
        person, first, second = funded_user()
        answers = []
        thread = threading.Thread(
            target=lambda: answers.append(call(server, "GET", "/test/pid?wait=1")), daemon=True)
        thread.start()
        pid = probe.pids.get(timeout=CLIENT_TIMEOUT)
        assert pg.sql("SELECT pg_terminate_backend(%s, 5000)", (pid,))[0][0] is True
        probe.release.set()
        thread.join(CLIENT_TIMEOUT + 5)
        (reply,) = answers
        assert_unavailable_problem(reply)

        # The dead session went nowhere near the pool: the next requests just work.
        reply = call(server, "GET", f"{API}/accounts", headers=person.headers)
        assert reply.status == 200, reply
        assert call(server, "GET", "/test/pid").body["pid"] != pid


def test_sessions_killed_between_requests_cost_no_failed_request(pg, pg_url):
    with served(pg_url, threads=4) as (server, _):
        person, first, second = funded_user()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT)
        try:
            for _ in range(3):
                assert call(server, "GET", f"{API}/accounts", headers=person.headers,
                            conn=conn).status == 200
                # Killed right after being handed back (no idle time for a
                # timed ping): the pool must still notice before reusing it.
                assert pg.terminate("hoardrun") >= 1
                reply = call(server, "GET", f"{API}/accounts", headers=person.headers, conn=conn)
                assert reply.status == 200, reply
                reply = call(server, "POST", f"{API}/transfers", transfer_body(first, second),
                             headers=person.headers, conn=conn)
                assert reply.status == 201, reply
        finally:
            conn.close()


def test_transfers_survive_sessions_killed_while_they_run(pg, pg_url):
    """Kill the app's sessions over and over under transfer load: all-or-nothing, every 201 kept."""
    with served(pg_url, threads=8) as (server, _):
        person, first, second = funded_user()
        replies, failures = [], []
        lock = threading.Lock()

        def client(offset):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=CLIENT_TIMEOUT)
            try:
                for n in range(offset, offset + 60):
                    pair = (first, second) if n % 2 else (second, first)
                    try:
                        reply = call(server, "POST", f"{API}/transfers", transfer_body(*pair),
                                     headers=person.headers, conn=conn)
                    except Exception as exc:  # reported below
                        with lock:
                            failures.append(repr(exc))
                        return
                    with lock:
                        replies.append(reply)
            finally:
                conn.close()

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for worker in workers:
            worker.start()
        kills = 0
        while any(w.is_alive() for w in workers):
            kills += pg.terminate("hoardrun")
            time.sleep(0.02)  # pacing only: let some transfers through between kills
        for worker in workers:
            worker.join(CLIENT_TIMEOUT)
        assert not failures, failures[:5]
        assert kills > 0
        assert len(replies) == 240
        for reply in replies:
            if reply.status != 201:
                assert_unavailable_problem(reply)
        acknowledged = [r.body["id"] for r in replies if r.status == 201]
        assert acknowledged, "no transfer got through at all"
        assert_books_whole(person, (first, second), acknowledged)
