"""The app under real servers (waitress, granian) on a loopback port, as curl and probes see it."""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

from hoardrun import db as dbm
from hoardrun import embedded, schema
from hoardrun.api import get_app
from hoardrun.api import serve as serving
from hoardrun.config import load_settings
from hoardrun.errors import ConfigError
from tests.conftest import base_environ, ensure_pg_database, pg_url, reset_pg_schema
from tests.integration.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]


def request(server, method, path, body=None, headers=None, conn=None):
    """One HTTP request over a real socket; returns (status, headers, parsed body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        data = json.loads(raw) if "json" in ctype and raw else raw
        return resp.status, resp, data
    finally:
        if own:
            conn.close()


@pytest.mark.parametrize("path, status, state", [
    ("/api/health", 200, "healthy"),
    ("/api/health/", 200, "healthy"),
    ("/api/health/detailed", 200, "healthy"),
    ("/api/health/database", 200, "healthy"),
    ("/api/health/readiness", 200, "ready"),
    ("/api/health/liveness", 200, "alive"),
])
def test_health_endpoints_over_http(live_server, path, status, state):
    code, resp, body = request(live_server, "GET", path)
    assert code == status
    assert resp.getheader("Content-Type") == "application/json"
    assert len(resp.getheader("X-Request-ID")) == 32
    assert body["status"] == state
    assert body["timestamp"].endswith("Z")


def test_problems_over_http(live_server):
    code, resp, body = request(live_server, "GET", "/api/missing",
                               headers={"X-Request-ID": "wire-1"})
    assert (code, resp.getheader("Content-Type")) == (404, "application/problem+json")
    assert body["request_id"] == "wire-1" == resp.getheader("X-Request-ID")

    code, resp, body = request(live_server, "PUT", "/api/health/readiness", body=b"{}",
                               headers={"Content-Type": "application/json"})
    assert code == 405
    assert "GET" in resp.getheader("Allow")
    assert body["type"].endswith("/method-not-allowed")


def test_an_oversized_body_is_refused_with_a_problem_over_http(live_server, settings):
    body = b"x" * (settings.max_body_bytes + 1)
    code, resp, problem = request(live_server, "POST", "/api/health", body=body,
                                  headers={"Content-Type": "application/json"})
    assert code == 413
    assert resp.getheader("Content-Type") == "application/problem+json"
    assert str(settings.max_body_bytes) in problem["detail"]


def test_many_keep_alive_clients_get_answers_and_the_pool_is_returned(live_server):
    failures, ids = [], []
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=30)
        try:
            for _ in range(20):
                code, resp, body = request(live_server, "GET", "/api/health/database", conn=conn)
                with lock:
                    ids.append(resp.getheader("X-Request-ID"))
                    if code != 200 or body["database"]["connection_healthy"] is not True:
                        failures.append((code, body))
        except Exception as exc:  # collected: a thread cannot fail the test itself
            failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    assert len(ids) == len(set(ids)) == 160
    pool = request(live_server, "GET", "/api/health/database")[2]["database"]["pool_info"]
    # every worker handed its connection back: only this probe holds one
    assert pool["checked_out"] == 1
    # four waitress threads never need more than four connections
    assert pool["checked_in"] + pool["checked_out"] <= 4


def test_get_app_serves_the_database_named_in_the_environment(environ, database_url):
    app = get_app(environ)
    settings = load_settings(environ)
    try:
        with LiveServer(app, settings) as server:
            code, _, body = request(server, "GET", "/api/health/database")
            assert code == 200
            assert body["database"]["database_url"] == settings.masked_database_url
    finally:
        dbm.close_db()


# -- start-up policy ---------------------------------------------------------------

def test_the_pool_is_at_least_as_large_as_the_thread_count(settings):
    assert serving.sized_for(settings.replace(pool_size=4), 8).pool_size == 8
    assert serving.sized_for(settings.replace(pool_size=20), 8).pool_size == 20


def _allowance(allowed):
    return dbm.ConnectionAllowance(allowed, allowed + 3, 3, f"max_connections {allowed + 3} - 3")


def test_every_workers_pool_fits_in_what_the_database_allows(settings):
    plan = dbm.plan_pools(settings.replace(pool_size=20, max_overflow=30), _allowance(97),
                          workers=2, threads=16)
    assert (plan.pool_size, plan.max_overflow) == (20, 28)
    assert plan.total == 96 <= 97
    small = dbm.plan_pools(settings.replace(pool_size=4, max_overflow=30), _allowance(40),
                           workers=4, threads=8)
    # the pool holds one connection per thread even when DATABASE_POOL_SIZE is smaller
    assert (small.pool_size, small.max_overflow, small.total) == (8, 2, 40)
    assert "4 worker(s) x 8 threads" in small.describe() and "of the 40" in small.describe()
    with pytest.raises(ConfigError, match=r"2 worker\(s\) x 16 threads need 32"):
        dbm.plan_pools(settings, _allowance(31), workers=2, threads=16)


def test_the_allowance_is_the_servers_less_its_reserved_slots_and_our_limit(database, settings):
    max_conn, reserved = (int(database.execute_sql(f"SHOW {name}").fetchone()[0])
                          for name in ("max_connections", "superuser_reserved_connections"))
    allowance = dbm.connection_allowance(settings)
    # PostgreSQL 16+ also keeps reserved_connections (0 unless configured)
    assert allowance.allowed <= max_conn - reserved
    assert allowance.max_connections == max_conn
    limited = dbm.connection_allowance(settings.replace(connection_limit=7))
    assert (limited.allowed, limited.reason) == (7, "DATABASE_CONNECTION_LIMIT 7")


@pytest.fixture
def empty_url():
    url = pg_url()
    parts = urlsplit(url)
    scratch = urlunsplit((parts.scheme, parts.netloc, parts.path + "_fresh", parts.query, ""))
    ensure_pg_database(scratch)
    reset_pg_schema(scratch)
    return scratch


def test_development_start_applies_pending_migrations(empty_url):
    settings = load_settings(base_environ(empty_url, HOARDRUN_ENV="development"))
    database = dbm.init_db(settings)
    try:
        assert serving.apply_or_report_migrations(settings) == schema.all_migrations()
        assert schema.pending_migrations(database) == []
        assert serving.apply_or_report_migrations(settings) == []
    finally:
        database.close_all()


def test_production_start_reports_pending_migrations_without_applying(empty_url, caplog):
    settings = load_settings(base_environ(empty_url, HOARDRUN_ENV="production",
                                          HOARDRUN_SMTP_URL="smtp://127.0.0.1:2525",
                                          HOARDRUN_MAIL_FROM="no-reply@example.com"))
    database = dbm.init_db(settings)
    caplog.set_level("INFO", logger="hoardrun.serve")
    try:
        assert serving.apply_or_report_migrations(settings) == []
        (line,) = [r for r in caplog.records if r.name == "hoardrun.serve"]
        assert line.levelno == logging.WARNING
        assert "NOT applied" in line.getMessage()
        assert all(name in line.getMessage() for name in schema.all_migrations())
        # nothing was written: not even the migration history table
        assert not database.table_exists(schema.MIGRATE_TABLE)
    finally:
        database.close_all()


# -- the whole thing, as an operator runs it ------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc, port, timeout=180):
    """Poll readiness until it answers (bounded: a first embedded start runs initdb,
    slow on a busy machine); returns (status, body)."""
    status = body = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health/readiness")
            resp = conn.getresponse()
            status, body = resp.status, json.loads(resp.read())
            conn.close()
            return status, body
        except OSError:
            if proc.poll() is not None:
                return None, None
            time.sleep(0.05)
    return status, body


def _start(env, port, server, workers=None, threads=8, **popen):
    code = ("from hoardrun.api.serve import serve; "
            f"serve(server={server!r}, host='127.0.0.1', port={port}, workers={workers!r}, "
            f"threads={threads})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _stop(proc):
    if proc.poll() is None:
        # Workers leave the parent's process group (serve.worker_app) and keep
        # the output pipe open: kill them too, or communicate() waits forever.
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        proc.kill()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        proc.communicate(timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, the POSIX form of Ctrl-C")
@pytest.mark.parametrize("server", ["granian", "waitress"])
def test_serve_starts_migrates_answers_and_stops_cleanly_on_ctrl_c(embedded_dir, server):
    """With no DATABASE_URL, as a newcomer runs it: on a PostgreSQL server it starts itself."""
    port = free_port()
    env = {**os.environ, **base_environ("", HOARDRUN_ENV="development",
                                        HOARDRUN_DATA_DIR=str(embedded_dir))}
    env.pop("DATABASE_URL")
    proc = _start(env, port, server,
                  # A terminal's Ctrl-C reaches the whole process group: the
                  # server's own session, so killpg below is that keypress.
                  start_new_session=True,
                  # NOTE: a shell started without job control (CI) may hand us
                  # SIGINT ignored; a terminal's Ctrl-C is what is tested here.
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        status, body = _wait_ready(proc, port)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        assert body["status"] == "ready"  # development start applied the migrations
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "applied" in out and "Serving on http://127.0.0.1:" in out and "stopped" in out
    assert f"on {server}:" in out and "connections of the" in out  # the pool plan line
    # Started once, by the parent, before any worker: the workers got its URL.
    assert out.count(f"using the embedded PostgreSQL 18 server in {embedded_dir}") == 1
    assert out.count("applied ") == 1
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # The server outlives the process that started it, ready for the next task.
    assert embedded.EmbeddedServer(embedded_dir).running_pid() is not None


def _sessions(url):
    """Other sessions on this test's database (nothing else of ours holds one here)."""
    conn = __import__("psycopg2").connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
@pytest.mark.parametrize("server, workers", [("granian", 2), ("waitress", 1)])
def test_sigterm_stops_every_worker_and_closes_their_sessions(database_url, server, workers):
    port = free_port()
    dbm.close_db()
    before = _sessions(database_url)
    proc = _start({**os.environ, **base_environ(database_url)}, port, server, workers=workers)
    try:
        status, _ = _wait_ready(proc, port)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        children = psutil.Process(proc.pid).children(recursive=True)
        if server == "granian":
            assert len(children) == workers
        # every worker answers and so holds a session of its own
        for _ in range(20):
            assert request(_Addr(port), "GET", "/api/health/database")[0] == 200
        assert _sessions(database_url) > before
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopped" in out
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for _ in range(50):  # the backends end a moment after their clients said goodbye
        if _sessions(database_url) == before:
            break
        time.sleep(0.1)
    assert _sessions(database_url) == before


class _Addr:
    host = "127.0.0.1"

    def __init__(self, port):
        self.port = port


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="kills a worker with SIGKILL")
def test_a_granian_worker_that_dies_is_replaced_and_requests_are_still_answered(database_url):
    port = free_port()
    proc = _start({**os.environ, **base_environ(database_url)}, port, "granian", workers=2)
    try:
        status, _ = _wait_ready(proc, port)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        before = {p.pid for p in psutil.Process(proc.pid).children()}
        assert len(before) == 2
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        answered, replaced = 0, set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answered += request(_Addr(port), "GET", "/api/health/liveness")[0] == 200
            except OSError:
                pass  # a connection the dead worker had accepted
            now = {p.pid for p in psutil.Process(proc.pid).children()
                   if p.status() != psutil.STATUS_ZOMBIE}
            replaced = now - before
            # A request the dead worker had accepted fails; the survivor's
            # answers are what this waits for, as well as the replacement.
            if replaced and len(now) == 2 and answered:
                break
            time.sleep(0.05)
        assert replaced and victim not in now, "the dead worker was not replaced"
        assert answered > 0  # the surviving worker kept answering meanwhile
        # and the new worker serves too: enough requests to reach both
        codes = [request(_Addr(port), "GET", "/api/health/database")[0] for _ in range(40)]
        assert codes == [200] * 40
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out
    assert "Unexpected exit from worker" in out
