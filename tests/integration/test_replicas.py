"""Read replicas against a real streaming standby (issue 15 item 2).

A throwaway primary (``PgInstance``, ``wal_level=replica``) and a hot standby
made from it with ``pg_basebackup -R`` and a replication slot; the app has
``DATABASE_URL`` on the primary and ``DATABASE_REPLICA_URLS`` on the standby.
Which server answered a read is told by what it shows: while the standby's
replay is paused (``pg_wal_replay_pause()``), money posted below the API is
on the primary only. The replica set's clock is pinned, so a test decides
when the cached lag check (one a second) is redone.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from falcon import testing

import helpers
from hoardrun import db as dbm
from hoardrun import accounts, ledger, replicas, schema
from hoardrun.api import create_app
from hoardrun.config import load_settings, mask_url
from tests.conftest import base_environ
from tests.integration.pg_instance import PgInstance, PgUnavailable, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds=replicas.CHECK_INTERVAL + 0.1):
        self.now += seconds


@pytest.fixture(scope="module")
def servers():
    """``(primary, standby, database name)``: a primary and its streaming standby."""
    try:
        primary = PgInstance()
    except PgUnavailable as error:
        pytest.skip(str(error))
    with primary:
        url = primary.create_database("app")
        database = dbm.init_db(load_settings(base_environ(url)))
        schema.migrate(database)
        database.close_all()
        standby = PgInstance.standby_of(primary, slot="hoardrun_test")
        with standby:  # started by the with
            yield primary, standby, "app"


def _replayed(primary, standby):
    """Whether the standby has replayed everything the primary has written."""
    (target,) = primary.sql("SELECT pg_current_wal_insert_lsn()::text")[0]
    return standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0][0]


def _caught_up(primary, standby):
    assert wait_until(lambda: _replayed(primary, standby), timeout=30), "standby did not catch up"


@pytest.fixture
def env(servers):
    primary, standby, name = servers
    # Resume replay a previous test may have left paused; empty every table.
    if standby.sql("SELECT pg_is_wal_replay_paused()")[0][0]:
        standby.sql("SELECT pg_wal_replay_resume()")
    tables = [t for (t,) in primary.sql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> %s",
        (schema.MIGRATE_TABLE,), database=name)]
    primary.sql("TRUNCATE {} CASCADE".format(", ".join(f'"{t}"' for t in tables)),
                database=name)
    _caught_up(primary, standby)
    return base_environ(primary.url(name), DATABASE_REPLICA_URLS=standby.url(name),
                        DATABASE_REPLICA_MAX_LAG="3600")


class World:
    def __init__(self, primary, standby, clock, client, settings):
        self.primary, self.standby, self.clock, self.client = primary, standby, clock, client
        self.settings = settings

    def pause(self):
        self.standby.sql("SELECT pg_wal_replay_pause()")
        assert wait_until(lambda: self.standby.sql(
            "SELECT pg_get_wal_replay_pause_state()")[0][0] == "paused")

    def resume(self):
        self.standby.sql("SELECT pg_wal_replay_resume()")
        _caught_up(self.primary, self.standby)


def _world(servers, environ, **extra):
    primary, standby, _ = servers
    settings = load_settings({**environ, **extra})
    database = dbm.init_db(settings)
    clock = Clock()
    app = create_app(settings, monotonic=clock)
    return database, World(primary, standby, clock, testing.TestClient(app), settings)


@pytest.fixture
def world(servers, env):
    database, world = _world(servers, env)
    yield world
    replicas.current().close()
    database.close_all()


def _balance(world, person, account_id):
    """The balance the accounts list shows (a read-only route)."""
    result = world.client.simulate_get("/api/v1/accounts", headers=person.headers)
    assert result.status_code == 200, result.text
    return {a["id"]: a["balance"] for a in result.json["items"]}[account_id]


def _history(world, person, account_id):
    result = world.client.simulate_get(f"/api/v1/accounts/{account_id}/transactions",
                                       headers=person.headers)
    assert result.status_code == 200, result.text
    return [e["amount"] for e in result.json["items"]]


def _user_with_account(world):
    """A user with 10.00 in an account, written below the API (nobody is marked a writer)."""
    person = helpers.make_user()
    account = accounts.open_account(person.id, "checking", "USD", "Everyday")
    ledger.deposit(account.id, 1000)
    _caught_up(world.primary, world.standby)
    world.clock.advance()
    return person, str(account.id)


def test_reads_come_from_the_replica_and_writers_read_their_writes(world):
    person, account = _user_with_account(world)
    assert _balance(world, person, account) == "10.00"

    world.pause()
    # Posted below the API: nobody is marked as its writer, so the replica
    # (within the max lag of this test) keeps answering without it.
    ledger.deposit(account, 500)
    world.clock.advance()
    assert _balance(world, person, account) == "10.00"
    assert _history(world, person, account) == ["10.00"]

    # Through the API the caller is the writer: their very next read, and
    # every read until the replica has replayed their write, is the primary's.
    result = world.client.simulate_post(f"/api/v1/accounts/{account}/deposits",
                                        headers={**person.headers, "Idempotency-Key": "ryw"},
                                        json={"amount": "1.00"})
    assert result.status_code == 201, result.text
    assert _balance(world, person, account) == "16.00"
    world.clock.advance()
    assert _history(world, person, account) == ["1.00", "5.00", "10.00"]

    world.resume()
    world.clock.advance()
    assert _balance(world, person, account) == "16.00"
    (replica,) = replicas.current().replicas
    assert replica.usable(world.settings.replica_max_lag)
    assert replica.database.pool_info()["checked_in"] >= 1  # it did answer reads


def test_a_lagging_replica_is_skipped(servers, env):
    database, world = _world(servers, env, DATABASE_REPLICA_MAX_LAG="1")
    try:
        person, account = _user_with_account(world)
        assert _balance(world, person, account) == "10.00"
        world.pause()
        ledger.deposit(account, 500)
        time.sleep(1.2)  # the replayed past is now older than the max lag
        world.clock.advance()
        assert _balance(world, person, account) == "15.00"
        (report,) = world.client.simulate_get("/api/health/detailed").json["replicas"]
        assert report["healthy"] is False and report["lag_seconds"] > 1, report
        assert report["error"] is None
        world.resume()
        world.clock.advance()
        assert _balance(world, person, account) == "15.00"
        # Caught up: healthy again (each health call checks afresh; WAL the
        # primary has not flushed yet may keep it behind for a moment).
        assert wait_until(lambda: world.client.simulate_get(
            "/api/health/detailed").json["replicas"][0]["healthy"], timeout=10)
    finally:
        replicas.current().close()
        database.close_all()


def test_a_replica_stopped_mid_run_costs_no_failed_request(world):
    person, account = _user_with_account(world)
    assert _balance(world, person, account) == "10.00"  # a pooled replica connection now
    statuses = []
    try:
        world.standby.stop()
        # The cached check still says "usable": the read that finds it down
        # is answered by the primary, and so is every read after it.
        for _ in range(3):
            result = world.client.simulate_get("/api/v1/accounts", headers=person.headers)
            statuses.append(result.status_code)
            assert result.json["items"][0]["balance"] == "10.00"
        world.clock.advance()
        for _ in range(3):
            statuses.append(world.client.simulate_get(
                f"/api/v1/accounts/{account}/transactions", headers=person.headers).status_code)
        assert statuses == [200] * 6
        detailed = world.client.simulate_get("/api/health/detailed")
        assert detailed.status_code == 200 and detailed.json["status"] == "healthy"
        (report,) = detailed.json["replicas"]
        assert report["healthy"] is False and report["error"], report
        assert report["url"] == mask_url(world.standby.url("app"))
    finally:
        world.standby.start()
    _caught_up(world.primary, world.standby)
    world.clock.advance()
    assert _balance(world, person, account) == "10.00"
    assert replicas.current().replicas[0].error is None


def test_db_check_verbose_shows_each_replica_and_its_lag(servers, env):
    primary, standby, _ = servers
    result = subprocess.run([sys.executable, "-m", "invoke", "db.check", "--verbose"],
                            cwd=ROOT, env={**env, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replicas:   1 (max lag 3600s)" in result.stdout
    shown = re.escape(mask_url(standby.url("app")))
    assert re.search(rf"^  {shown}: ok, lag [0-9.]+s, replayed to [0-9A-F]+/[0-9A-F]+$",
                     result.stdout, re.M), result.stdout
