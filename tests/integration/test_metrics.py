"""``GET /metrics``: exact counters after a known sequence, operators only, summed over processes."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from falcon import testing
from money_helpers import deposit, open_account, post_money, problem
from prometheus_client.parser import text_string_to_metric_families

from hoardrun.api import create_app
from tests.conftest import base_environ

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "scrape-" + "t" * 40
ACCOUNT = "/api/v1/accounts/{account_id:uuid}"


def samples(text):
    """``{(name, frozenset(labels)): value}`` of every sample in a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape, name, **labels):
    return scrape.get((name, frozenset(labels.items())), 0.0)


def scrape(client, token=TOKEN):
    result = client.simulate_get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/plain; version=")
    return samples(result.text)


@pytest.fixture
def metrics_app(settings, database):
    return create_app(settings.replace(metrics=True, metrics_token=TOKEN))


@pytest.fixture
def mclient(metrics_app):
    return testing.TestClient(metrics_app)


def test_counters_match_a_known_sequence_of_requests(mclient, make_user):
    jane = make_user()
    acc = open_account(mclient, jane)
    deposit(mclient, jane, acc["id"], "50.00", key="dep-1")                     # posted
    again = post_money(mclient, jane, f"/accounts/{acc['id']}/deposits",        # replayed
                       {"amount": "50.00", "description": None}, key="dep-1")
    assert again.headers["idempotent-replayed"] == "true"
    problem(post_money(mclient, jane, f"/accounts/{acc['id']}/withdrawals",     # refused, no key
                       {"amount": "80.00"}), 422, "insufficient-funds")
    problem(post_money(mclient, jane, f"/accounts/{acc['id']}/withdrawals",     # refused, keyed
                       {"amount": "90.00"}, key="wd-1"), 422, "insufficient-funds")
    post_money(mclient, jane, f"/accounts/{acc['id']}/withdrawals", {"amount": "90.00"},
               key="wd-1")                                                      # replayed refusal
    for _ in range(3):
        assert mclient.simulate_get(f"{ACCOUNT.split('{')[0]}{acc['id']}",
                                    headers=jane.headers).status_code == 200
    assert mclient.simulate_get("/no/such/place/1").status_code == 404
    assert mclient.simulate_get("/no/such/place/2").status_code == 404

    got = scrape(mclient)
    req = "hoardrun_http_requests_total"
    assert value(got, req, method="POST", route="/api/v1/accounts", status="201") == 1
    assert value(got, req, method="POST", route=f"{ACCOUNT}/deposits", status="201") == 2
    assert value(got, req, method="POST", route=f"{ACCOUNT}/withdrawals", status="422") == 3
    assert value(got, req, method="GET", route=ACCOUNT, status="200") == 3
    assert value(got, req, method="GET", route="unmatched", status="404") == 2
    # The scrape that answers is counted after it renders: it is not in its own numbers.
    assert value(got, req, method="GET", route="/metrics", status="200") == 0
    assert sum(v for (name, _), v in got.items() if name == req) == 11

    lat = "hoardrun_http_request_duration_seconds"
    assert value(got, lat + "_count", method="GET", route=ACCOUNT) == 3
    assert value(got, lat + "_bucket", method="GET", route=ACCOUNT, le="+Inf") == 3
    assert 0 < value(got, lat + "_sum", method="GET", route=ACCOUNT) < 30

    mov = "hoardrun_ledger_movements_total"
    assert value(got, mov, kind="deposit", outcome="posted", reason="") == 1
    assert value(got, mov, kind="withdrawal", outcome="refused",
                 reason="insufficient-funds") == 2
    assert sum(v for (name, _), v in got.items() if name == mov) == 3
    rep = "hoardrun_idempotent_replays_total"
    assert value(got, rep, kind="deposit") == 1 and value(got, rep, kind="withdrawal") == 1

    pool = "hoardrun_db_pool_connections"
    assert value(got, pool, state="in_use") == 0  # every request handed its connection back
    assert value(got, pool, state="idle") >= 1
    assert value(got, pool, state="overflow") == 0

    later = scrape(mclient)
    assert value(later, req, method="GET", route="/metrics", status="200") == 1


def test_metrics_are_off_unless_the_operator_turns_them_on(client, settings):
    assert settings.metrics is False
    assert client.simulate_get("/metrics").status_code == 404


def test_with_a_token_only_the_scraper_reads_them(mclient):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        result = mclient.simulate_get("/metrics", headers=headers)
        problem(result, 401, "unauthorized")
        assert "hoardrun_" not in result.text
    scrape(mclient)


def test_the_metrics_route_is_in_the_openapi_document(metrics_app):
    doc = testing.TestClient(metrics_app).simulate_get("/api/openapi.json").json
    assert set(doc["paths"]["/metrics"]) == {"get"}
    assert {"200", "401"} <= set(doc["paths"]["/metrics"]["get"]["responses"])


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url, headers=None, data=None):
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_one_scrape_shows_the_sum_of_several_server_processes(database_url, client, make_user,
                                                             tmp_path):
    jane = make_user()
    acc = open_account(client, jane)
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "HOARDRUN_", "PROMETHEUS_"))}
    env.update(base_environ(database_url, HOARDRUN_METRICS="true", HOARDRUN_METRICS_TOKEN=TOKEN,
                            PROMETHEUS_MULTIPROC_DIR=str(shared)))
    ports = [_free_port(), _free_port()]
    servers = [subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT),
                                 "serve", "--port", str(port), "--threads", "2"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for port in ports]
    try:
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        deadline = time.monotonic() + 60
        for base in (a, b):
            while True:
                try:
                    if _get(base + "/api/health/liveness")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "a server did not start"
                time.sleep(0.2)
        for base, n in ((a, 3), (b, 4)):
            for _ in range(n):
                assert _get(base + "/api/health/liveness")[0] == 200
        money = {**jane.headers, "Content-Type": "application/json", "Idempotency-Key": "k"}
        body = b'{"amount": "5.00"}'
        assert _get(f"{a}/api/v1/accounts/{acc['id']}/deposits", money, body)[0] == 201
        assert _get(f"{b}/api/v1/accounts/{acc['id']}/deposits", money, body)[0] == 201
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for base in (a, b):
            status, text = _get(base + "/metrics", auth)
            assert status == 200, text
            got = samples(text)
            live = "hoardrun_http_requests_total"
            # 1 + 1 readiness polls at least, then 3 + 4: the sum over both processes.
            assert value(got, live, method="GET", route="/api/health/liveness",
                         status="200") >= 9
            assert value(got, "hoardrun_ledger_movements_total", kind="deposit",
                         outcome="posted", reason="") == 1
            assert value(got, "hoardrun_idempotent_replays_total", kind="deposit") == 1
        exact_a = samples(_get(a + "/metrics", auth)[1])
        exact_b = samples(_get(b + "/metrics", auth)[1])
        key = ("hoardrun_http_requests_total",
               frozenset(dict(method="GET", route="/api/health/liveness", status="200").items()))
        assert exact_a[key] == exact_b[key]
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
        for server in servers:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
