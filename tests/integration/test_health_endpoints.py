"""The five health probes, as a load balancer, a Kubernetes probe and an operator see them."""

import platform
import socket
import threading
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg2
import pytest
from falcon import testing

import hoardrun
from hoardrun import db as dbm
from hoardrun import schema
from hoardrun.api import create_app
from hoardrun.config import load_settings
from tests.conftest import base_environ, ensure_pg_database, pg_url, reset_pg_schema

ENDPOINTS = ("/api/health", "/api/health/", "/api/health/detailed", "/api/health/database",
             "/api/health/readiness", "/api/health/liveness")
PASSWORD = "Sup3r-Secret-pw"


def parse_timestamp(text):
    """A health timestamp: ISO 8601, UTC, written with Z."""
    assert text.endswith("Z"), text
    value = datetime.fromisoformat(text[:-1] + "+00:00")
    assert value.utcoffset().total_seconds() == 0
    return value


def with_password(url, password=PASSWORD):
    """``url`` with ``password`` set for its user (trust auth ignores it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def app_for(environ, **kwargs):
    """Bind the database ``environ`` names and build an app and client for it."""
    settings = load_settings(environ)
    database = dbm.init_db(settings)
    app = create_app(settings, **kwargs)
    return settings, database, testing.TestClient(app)


# -- healthy ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/health", "/api/health/"])
def test_basic_health_says_the_database_answered(client, path):
    before = datetime.now(timezone.utc)
    resp = client.simulate_get(path)
    assert resp.status_code == 200
    body = resp.json
    assert body["status"] == "healthy"
    assert body["database_healthy"] is True
    assert body["database"] == "connected"
    assert parse_timestamp(body["timestamp"]) >= before.replace(microsecond=0)


def test_detailed_health_reports_service_host_and_database(client, settings):
    body = client.simulate_get("/api/health/detailed").json
    assert body["status"] == "healthy"
    assert body["service"] == "hoardrun"
    assert body["version"] == hoardrun.__version__
    assert body["environment"] == settings.env == "test"
    assert body["uptime"] >= 0
    parse_timestamp(body["timestamp"])
    system = body["system"]
    assert system["python_version"] == platform.python_version()
    assert system["memory"]["total"] > 0 and 0 <= system["memory"]["percent"] <= 100
    assert system["disk"]["total"] > 0 and system["disk"]["free"] <= system["disk"]["total"]
    assert body["dependencies"] == {"database": True}
    assert body["database"]["connection_healthy"] is True
    assert body["database"]["database_version"].startswith("PostgreSQL")


def test_database_health_reports_version_and_live_pool(client, settings):
    resp = client.simulate_get("/api/health/database")
    assert resp.status_code == 200
    body = resp.json
    assert body["status"] == "healthy"
    parse_timestamp(body["timestamp"])
    database = body["database"]
    assert database["connection_healthy"] is True
    assert database["database_version"].startswith("PostgreSQL")
    # the request itself holds the only connection while the pool is read
    assert database["pool_info"] == {"pool_size": settings.pool_size, "checked_in": 0,
                                     "checked_out": 1, "overflow": 0}
    assert database["database_url"] == settings.masked_database_url


def test_readiness_is_ready_on_a_migrated_database(client):
    resp = client.simulate_get("/api/health/readiness")
    assert resp.status_code == 200
    body = resp.json
    assert body["status"] == "ready"
    parse_timestamp(body["timestamp"])
    # The original service's field, kept exactly: a plain string per check.
    assert body["checks"] == {"database": "healthy", "migrations": "up_to_date"}
    assert body["details"] == {"database": {"status": "healthy"},
                               "migrations": {"status": "up_to_date", "pending": []}}
    assert body["failed"] == []


def test_liveness_reports_uptime_from_the_pinned_clock(settings, database):
    ticks = iter([1000.0, 1042.5])
    client = testing.TestClient(create_app(settings, monotonic=lambda: next(ticks)))
    resp = client.simulate_get("/api/health/liveness")
    assert resp.status_code == 200
    assert resp.json["status"] == "alive"
    assert resp.json["uptime"] == 42.5
    parse_timestamp(resp.json["timestamp"])


def test_liveness_never_checks_out_a_connection(client):
    for _ in range(3):
        assert client.simulate_get("/api/health/liveness").status_code == 200
    info = dbm.pool_info()
    assert info["checked_in"] == 0 and info["checked_out"] == 0


def test_timestamps_come_from_the_injected_clock(settings, database):
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    client = testing.TestClient(create_app(settings, clock=lambda: fixed))
    for path in ENDPOINTS:
        assert client.simulate_get(path).json["timestamp"] == "2030-01-02T03:04:05Z", path


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_other_methods_get_405_with_allow(client, path, method):
    resp = client.simulate_request(method, path)
    assert resp.status_code == 405
    assert "GET" in resp.headers["Allow"]
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.json["status"] == 405


# -- pool numbers ------------------------------------------------------------

def test_pool_numbers_move_when_connections_are_held(client):
    held, release = threading.Barrier(4), threading.Event()
    errors = []

    def hold():
        try:
            dbm.db.connect(reuse_if_open=True)
            dbm.db.execute_sql("SELECT 1")
            held.wait(timeout=30)
            release.wait(timeout=30)
        except Exception as exc:  # reported below; a thread cannot fail the test
            errors.append(exc)
        finally:
            dbm.release_connection()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    held.wait(timeout=30)
    try:
        during = client.simulate_get("/api/health/database").json["database"]["pool_info"]
    finally:
        release.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    after = client.simulate_get("/api/health/database").json["database"]["pool_info"]
    assert (during["checked_out"], during["checked_in"]) == (4, 0)
    assert (after["checked_out"], after["checked_in"]) == (1, 3)


# -- pending migrations -------------------------------------------------------

@pytest.fixture
def empty_database_url():
    """A database with no schema at all, on the test server."""
    url = pg_url()
    parts = urlsplit(url)
    scratch = urlunsplit((parts.scheme, parts.netloc, parts.path + "_empty", parts.query, ""))
    ensure_pg_database(scratch)
    reset_pg_schema(scratch)
    return scratch


def test_readiness_waits_for_pending_migrations_then_recovers(empty_database_url):
    settings, database, client = app_for(base_environ(empty_database_url))
    try:
        resp = client.simulate_get("/api/health/readiness")
        assert resp.status_code == 503
        assert resp.headers["Retry-After"]
        body = resp.json
        assert body["status"] == "not_ready"
        assert body["failed"] == ["migrations"]
        assert body["checks"] == {"database": "healthy", "migrations": "pending"}
        assert body["details"]["migrations"]["pending"] == schema.all_migrations()
        # the probe itself must not have written anything (no history table)
        assert not database.table_exists(schema.MIGRATE_TABLE)

        schema.migrate(database)
        dbm.release_connection()
        resp = client.simulate_get("/api/health/readiness")
        assert resp.status_code == 200
        assert resp.json["status"] == "ready"
    finally:
        database.close_all()


# -- database unreachable -------------------------------------------------------

@pytest.fixture
def unreachable_environ():
    """An environment whose database cannot be reached (a closed port)."""
    # port 1 on loopback: nothing listens there, refused at once
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/hoardrun"
    return base_environ(url, DATABASE_CONNECT_TIMEOUT="1")


@pytest.fixture
def unreachable(unreachable_environ):
    settings, database, client = app_for(unreachable_environ)
    yield client
    database.close_all()


def test_basic_health_stays_200_when_the_database_is_down(unreachable):
    resp = unreachable.simulate_get("/api/health")
    assert resp.status_code == 200
    assert resp.json["status"] == "healthy"
    assert resp.json["database_healthy"] is False
    assert resp.json["database"] == "disconnected"


def test_detailed_health_is_degraded_when_the_database_is_down(unreachable):
    resp = unreachable.simulate_get("/api/health/detailed")
    assert resp.status_code == 200
    assert resp.json["status"] == "degraded"
    assert resp.json["dependencies"] == {"database": False}
    assert resp.json["database"]["connection_healthy"] is False


def test_database_health_is_503_with_an_error_when_down(unreachable):
    resp = unreachable.simulate_get("/api/health/database")
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    body = resp.json
    assert body["status"] == "unhealthy"
    parse_timestamp(body["timestamp"])
    assert body["database"]["connection_healthy"] is False
    assert body["database"]["database_version"] is None
    assert body["database"]["error"]
    assert body["database"]["pool_info"]["checked_out"] == 0


def test_readiness_names_the_database_when_down(unreachable):
    resp = unreachable.simulate_get("/api/health/readiness")
    assert resp.status_code == 503
    assert resp.json["status"] == "not_ready"
    assert resp.json["failed"] == ["database", "migrations"]
    assert resp.json["checks"] == {"database": "unhealthy", "migrations": "unknown"}
    assert resp.json["details"]["database"]["error"]


def test_liveness_answers_without_a_database(unreachable):
    resp = unreachable.simulate_get("/api/health/liveness")
    assert resp.status_code == 200
    assert resp.json["status"] == "alive"


def test_no_password_in_any_body_or_log_line_when_down(unreachable, caplog):
    caplog.set_level("DEBUG")
    for path in ENDPOINTS:
        resp = unreachable.simulate_get(path)
        assert PASSWORD not in resp.text, path
    assert "Connection refused" in unreachable.simulate_get(
        "/api/health/database").json["database"]["error"]
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


# -- a password in the URL, killed connections, a restart ----------

@pytest.fixture
def pg_with_password(database_url):
    """This test's PostgreSQL database reached through a URL that carries a password."""
    settings, database, client = app_for(base_environ(with_password(database_url)))
    yield settings, client
    database.close_all()


def test_password_never_appears_in_health_bodies_or_logs(pg_with_password, caplog):
    settings, client = pg_with_password
    caplog.set_level("DEBUG")
    for path in ENDPOINTS:
        resp = client.simulate_get(path)
        assert resp.status_code == 200, (path, resp.text)
        assert PASSWORD not in resp.text, path
    database_url = client.simulate_get("/api/health/database").json["database"]["database_url"]
    assert database_url == "postgresql://***@" + database_url.split("@", 1)[1]
    assert PASSWORD not in caplog.text


def _terminate_app_connections(url):
    """Kill, server-side, every session our pool opened on this test database."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = 'hoardrun' "
                        "AND pid <> pg_backend_pid()")
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_a_connection_killed_server_side_costs_no_failed_probe(client, database_url):
    assert client.simulate_get("/api/health/database").status_code == 200
    before = client.simulate_get("/api/health/database").json["database"]["pool_info"]
    assert before["checked_in"] + before["checked_out"] == 1
    assert _terminate_app_connections(database_url) == 1

    resp = client.simulate_get("/api/health/database")
    assert resp.status_code == 200, resp.text
    assert resp.json["database"]["connection_healthy"] is True
    assert _terminate_app_connections(database_url) == 1
    resp = client.simulate_get("/api/health/readiness")
    assert resp.status_code == 200, resp.text
    assert resp.json["status"] == "ready"


class TcpProxy:
    """A loopback TCP forwarder that can be taken down and brought back (a DB "restart").

    ``target`` is ``(host, port)``, or the path of a server's Unix socket (the
    embedded test server listens on no TCP address).
    """

    def __init__(self, target):
        self.target = target
        self.port = None
        self._listener = None
        self._sockets = set()
        self._lock = threading.Lock()

    def up(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self):
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            listener, self._listener = self._listener, None
        for sock in [listener, *sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                if isinstance(self.target, str):
                    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    server.settimeout(5)
                    server.connect(self.target)
                else:
                    server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_readiness_recovers_after_the_database_comes_back(database_url):
    parts = urlsplit(database_url)
    query = dict(parse_qsl(parts.query))
    port = int(query.pop("port", None) or parts.port or 5432)
    socket_dir = query.pop("host", None)
    proxy = TcpProxy(f"{socket_dir}/.s.PGSQL.{port}" if socket_dir
                     else (parts.hostname, port))
    proxy.up()
    via_proxy = urlunsplit((parts.scheme, f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}",
                            parts.path, urlencode(query), ""))
    settings, database, client = app_for(base_environ(via_proxy, DATABASE_CONNECT_TIMEOUT="2"))
    try:
        assert client.simulate_get("/api/health/readiness").status_code == 200

        proxy.down()  # the database "goes away": open connections die, new ones are refused
        resp = client.simulate_get("/api/health/readiness")
        assert resp.status_code == 503
        assert resp.json["failed"][0] == "database"
        assert client.simulate_get("/api/health/database").status_code == 503
        assert client.simulate_get("/api/health/liveness").status_code == 200

        proxy.up()  # and comes back on the same address: same app, no restart
        resp = client.simulate_get("/api/health/readiness")
        assert resp.status_code == 200, resp.text
        assert client.simulate_get("/api/health/database").json["database"][
            "connection_healthy"] is True
    finally:
        database.close_all()
        proxy.down()
