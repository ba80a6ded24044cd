"""The app under a real waitress server on a loopback port, as curl and probes see it."""

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

import pytest

from hoardrun import db as dbm
from hoardrun import embedded, schema
from hoardrun.api import get_app
from hoardrun.api import serve as serving
from hoardrun.config import load_settings
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


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, the POSIX form of Ctrl-C")
def test_serve_starts_migrates_answers_and_stops_cleanly_on_ctrl_c(embedded_dir):
    """With no DATABASE_URL, as a newcomer runs it: on a PostgreSQL server it starts itself."""
    port = free_port()
    env = {**os.environ, **base_environ("", HOARDRUN_ENV="development",
                                        HOARDRUN_DATA_DIR=str(embedded_dir))}
    env.pop("DATABASE_URL")
    code = ("from hoardrun.api.serve import serve; "
            f"serve(host='127.0.0.1', port={port}, threads=8)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # NOTE: a shell started without job control (CI) may hand us
                            # SIGINT ignored; a terminal's Ctrl-C is what is tested here.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        status = None
        # Bounded wait for the socket: the embedded server is initialised and
        # every migration applied first (seconds on a busy 2-core machine).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/health/readiness")
                resp = conn.getresponse()
                status, body = resp.status, json.loads(resp.read())
                conn.close()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        assert body["status"] == "ready"  # development start applied the migrations
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "applied" in out and "Serving on http://127.0.0.1:" in out and "stopped" in out
    assert f"using the embedded PostgreSQL 18 server in {embedded_dir}" in out
    # The server outlives the process that started it, ready for the next task.
    assert embedded.EmbeddedServer(embedded_dir).running_pid() is not None
