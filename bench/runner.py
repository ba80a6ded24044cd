"""`invoke bench`: seed a PostgreSQL bench database, serve the real app, measure.

One run: a dedicated database is (re)created, migrated and seeded; for each
server (granian, waitress or both) the app runs in its own process tree on a
free loopback port, and so does a bare WSGI app returning fixed JSON under
the same server, workers and threads; wrk (or, without it, Python
generator processes) drives each scenario with N keep-alive clients while
the OS's CPU accounting of the app's processes and of PostgreSQL's backends
is read; two ceilings are driven by pgbench: the ledger call alone, and
every statement one keyed API transfer sends (captured from the app, see
``replay.py``); the ledger call is driven again in alternating rounds on a
copy of the bench database, its chain hash swapped for a constant in every
other round (the chain's cost); history pages and balances as of random instants are timed at 10k,
100k and 1M entries in one account. The table and each target are printed
and written as JSON under bench/results/.
"""

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg2

from hoardrun import auth, schema
from hoardrun import db as dbm
from hoardrun.api.serve import DEFAULT_WORKERS as DEFAULT_GRANIAN_WORKERS
from hoardrun.config import load_settings, mask_url
from hoardrun.history import entries_cursor

from . import ceiling, cpu, replay, seed, wrk

log = logging.getLogger("hoardrun.bench")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/hoardrun_bench"
# Fixed random values: the bench runs with HOARDRUN_ENV=production, which
# refuses placeholder secrets.
SECRET = "Np7UbFHfs-E9edg-SqYFf3ESqOFUbw71SQ7o7qVgwylSwj4iM9weZNiDIFW-cVnh"
CARD_KEY = "0VKJwLogMvbdgst_DX3hcdtPzhafMIb-mxIkdldV2aI="
# Production settings need SMTP; the bench never sends mail (no route it drives queues any).
MAIL_ENV = {"HOARDRUN_SMTP_URL": "smtp://127.0.0.1:2525",
            "HOARDRUN_MAIL_FROM": "no-reply@bench.hoardrun.test"}
#: name -> clients (None: --clients). "bare" is the bare WSGI app's health.
SCENARIOS = {"bare": None, "health": None, "health_database": None, "account": None,
             "transfer": None, "batch": None, "p2p": None, "deposit": None, "withdrawal": None,
             "card_payment": None, "investment_buy": None, "history_first": None,
             "history_deep": None, "statement": None, "transfer@32": 32, "deposit@32": 32}
SERVERS = ("granian", "waitress")
#: Legs per ``POST /payments/batch`` of the batch scenario (the API's maximum).
BATCH_LEGS = 100
SCALING_SIZES = (10_000, 100_000, 1_000_000)
# Quick mode still runs the scaling step, at two tiny sizes: every row and check
# of it is exercised, in seconds.
QUICK = {"seconds": 1, "users": 40, "accounts": 80, "entries": 2_000,
         "scaling_sizes": (1_000, 4_000)}
#: Distinct random instants per balance-as-of measurement, and how many of them
#: fall before the account's first entry (where the balance is zero).
AS_OF_INSTANTS = 400
AS_OF_BEFORE_FIRST = 10
TARGETS = {"full_ratio": 0.6, "transfer_app_cpu_us": 500.0, "transfer_p99_ms": 20.0,
           "history_vs_transfer": 1.0, "statement_vs_transfer": 1.5, "health_vs_bare": 0.5,
           "rss_mib": 200.0, "deposit_vs_transfer": 0.9, "deposit32_p99_ms": 60.0,
           "scaling_spread": 1.5, "batch_legs_vs_transfer": 5.0, "as_of_p99_ms": 5.0,
           "chain_slowdown_pct": 10.0}
#: Alternating rounds per variant of the chain-cost ceiling.
CHAIN_ROUNDS = 3
CARD_USERS = 100


class BenchError(Exception):
    """The bench could not run (one line for the task to print)."""


def percentile(values, q):
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def summarise(name, raw):
    """Throughput and latency percentiles of one scenario's raw results."""
    if raw.get("tool") == "wrk":
        elapsed = raw["elapsed"] or 1.0
        return {"scenario": name, "requests": raw["requests"],
                "rps": round((raw["requests"] - raw["errors"]) / elapsed, 1),
                "p50_ms": round(raw["p50_ms"], 2), "p95_ms": round(raw["p95_ms"], 2),
                "p99_ms": round(raw["p99_ms"], 2), "errors": raw["errors"],
                "error_samples": [f"wrk: {raw['error_kinds']}"] if raw["errors"] else []}
    lat = raw["latencies"]
    elapsed = raw.get("elapsed") or 1.0
    ok = len(lat) - raw["errors"]
    return {"scenario": name, "requests": len(lat), "rps": round(ok / elapsed, 1),
            "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2), "errors": raw["errors"],
            "error_samples": raw.get("error_samples", [])}


def _admin_url(url):
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))


def recreate_database(url):
    """Drop and create the bench database named in ``url``."""
    name = urlsplit(url).path.lstrip("/")
    if not name.replace("_", "").isalnum() or "bench" not in name:
        raise BenchError(f"refusing to recreate {name!r}: the bench database name must "
                         "contain 'bench'")
    conn = psycopg2.connect(_admin_url(url))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def drop_database(url):
    """Drop the bench database."""
    name = urlsplit(url).path.lstrip("/")
    conn = psycopg2.connect(_admin_url(url))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def free_port():
    """A free loopback port (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environ(url):
    """The environment the bench server runs with: production settings, pinned secrets."""
    env = dict(os.environ)
    env.update({"DATABASE_URL": url, "HOARDRUN_ENV": "production",
                "HOARDRUN_SECRET_KEY": SECRET, "HOARDRUN_CARD_ENCRYPTION_KEYS": CARD_KEY,
                **MAIL_ENV})
    return env


class Server:
    """An app under ``server`` in a child process tree, each process's RSS sampled.

    ``app="hoardrun"`` runs ``hoardrun.api.serve.serve`` (what ``invoke serve``
    runs); ``app="bare"`` serves ``bench.bare:app`` with the same server,
    workers and threads.
    """

    def __init__(self, url, server, workers, threads, log_path, app="hoardrun"):
        self.port = free_port()
        self.server, self.workers, self.threads = server, workers, threads
        self.log_file = open(log_path, "w", encoding="utf-8")
        if app == "hoardrun":
            code = ("from hoardrun.api.serve import serve; "
                    f"serve(server={server!r}, host='127.0.0.1', port={self.port}, "
                    f"workers={workers}, threads={threads})")
        elif server == "granian":
            code = ("from hoardrun.api.serve import granian_server; "
                    f"granian_server('bench.bare:app', host='127.0.0.1', port={self.port}, "
                    f"workers={workers}, threads={threads}, factory=False).serve()")
        else:
            code = ("import waitress; from bench.bare import app; "
                    f"waitress.serve(app, host='127.0.0.1', port={self.port}, threads={threads})")
        self.ready_path = "/api/health/readiness" if app == "hoardrun" else "/"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                     env=server_environ(url), stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        self.peak_rss = 0  # the largest single process (a worker), bytes
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def processes(self):
        """The server's processes (main and workers)."""
        return cpu.server_processes(self.proc.pid)

    def _sample(self):
        while not self._stop.is_set():
            for process in self.processes():
                try:
                    self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with {self.proc.returncode}: see "
                                 f"{self.log_file.name}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        self._sampler.start()
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError("the server did not become ready in time")

    def stop(self):
        self._stop.set()
        self.proc.terminate()  # SIGTERM: every worker stops (tested in test_server.py)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for process in self.processes():
                process.kill()
        self.log_file.close()


#: Load-generator processes per scenario. Python clients share one GIL per
#: process; spreading the connections over a few processes keeps the
#: generator from being the bottleneck it measures (pgbench, for the ceiling,
#: is C).
LOADGEN_PROCESSES = 4


def drive(port, clients, seconds, requests, processes=None, loadgen="auto"):
    """Run one scenario with wrk when available, else Python generator processes."""
    if loadgen == "wrk" or (loadgen == "auto" and wrk.available()):
        return wrk.run(port, clients, seconds, requests)
    return drive_python(port, clients, seconds, requests, processes)


def drive_python(port, clients, seconds, requests, processes=None):
    """Run one scenario in separate load-generator processes; return the merged results."""
    processes = max(1, min(clients, processes or LOADGEN_PROCESSES))
    shares = [clients // processes + (1 if i < clients % processes else 0)
              for i in range(processes)]
    procs = []
    for i, share in enumerate(shares):
        # Each process starts at its own place in the request list.
        offset = len(requests) * i // processes
        job = {"host": "127.0.0.1", "port": port, "clients": share, "seconds": seconds,
               "requests": requests[offset:] + requests[:offset]}
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen"], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Hand every process its job before waiting on any: they run together.
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        procs.append(proc)
    merged = {"latencies": [], "errors": 0, "error_samples": [], "elapsed": 0.0}
    for proc in procs:
        out, err = proc.stdout.read(), proc.stderr.read()  # little on stderr: no deadlock
        proc.wait()
        if proc.returncode != 0:
            raise BenchError("the load generator failed: " + err.strip()[-500:])
        raw = json.loads(out)
        merged["latencies"].extend(raw["latencies"])
        merged["errors"] += raw["errors"]
        merged["error_samples"].extend(raw["error_samples"])
        merged["elapsed"] = max(merged["elapsed"], raw["elapsed"])
    return merged


def _get_json(port, path, token):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _deep_cursor(url, account_id, depth):
    """A cursor positioned ``depth`` entries into an account's history (newest first)."""
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT created_at, id FROM transactions WHERE account_id = %s "
                    "ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1", (account_id, depth))
        row = cur.fetchone()
    conn.close()
    if row is None:
        raise BenchError(f"account {account_id} has fewer than {depth + 1} entries")
    return entries_cursor(SECRET, account_id, row[0], row[1])


def build_requests(name, people, tokens, url, *, cards=None, count=400, depth=60):
    """The request list one scenario cycles through (``name`` without its ``@clients``)."""
    rng = random.Random(7)
    if name == "card_payment":
        people = [p for p in people if p[0] in (cards or {})]
        if not people:
            raise BenchError("no bench user has a card")
    picks = [rng.randrange(len(people)) for _ in range(count)]
    now = datetime.now(timezone.utc)
    out, deep = [], {}
    for i in picks:
        user_id, email, accounts = people[i]
        auth_header = {"Authorization": f"Bearer {tokens[user_id]}"}
        checking, savings = accounts["checking"], accounts["savings"]
        if name in ("health", "bare"):
            out.append({"method": "GET", "path": "/api/health/"})
        elif name == "health_database":
            out.append({"method": "GET", "path": "/api/health/database"})
        elif name == "account":
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}",
                        "headers": auth_header})
        elif name == "transfer":
            src, dst = (checking, savings) if rng.random() < 0.5 else (savings, checking)
            out.append({"method": "POST", "path": "/api/v1/transfers", "headers": auth_header,
                        "unique_key": True,
                        "body": {"from_account_id": src, "to_account_id": dst,
                                 "amount": "0.01", "description": "bench"}})
        elif name == "batch":
            # Half the legs each way: every batch nets to zero, so nothing runs dry.
            legs = [{"from_account_id": checking if k % 2 == 0 else savings,
                     "to_account_id": savings if k % 2 == 0 else checking,
                     "amount": "0.01", "description": "bench"} for k in range(BATCH_LEGS)]
            out.append({"method": "POST", "path": "/api/v1/payments/batch",
                        "headers": auth_header, "unique_key": True, "body": {"legs": legs}})
        elif name == "p2p":
            other = people[(i + 1 + rng.randrange(len(people) - 1)) % len(people)]
            out.append({"method": "POST", "path": "/api/v1/p2p", "headers": auth_header,
                        "unique_key": True,
                        "body": {"from_account_id": checking, "recipient_email": other[1],
                                 "amount": "0.01", "note": "bench"}})
        elif name in ("deposit", "withdrawal"):
            out.append({"method": "POST", "path": f"/api/v1/accounts/{checking}/{name}s",
                        "headers": auth_header, "unique_key": True,
                        "body": {"amount": "0.01", "description": "bench"}})
        elif name == "card_payment":
            out.append({"method": "POST", "path": f"/api/v1/cards/{cards[user_id]}/payments",
                        "headers": auth_header, "unique_key": True,
                        "body": {"merchant_name": "Bench Shop", "merchant_category": "5411",
                                 "amount": "0.01", "currency": "USD", "channel": "chip"}})
        elif name == "investment_buy":
            out.append({"method": "POST", "path": "/api/v1/investments/orders",
                        "headers": auth_header, "unique_key": True,
                        "body": {"account_id": accounts["investment"], "symbol": "AAPL",
                                 "side": "buy", "quantity": "0.0001"}})
        elif name == "history_first":
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/transactions"
                        "?limit=20", "headers": auth_header})
        elif name == "history_deep":
            if checking not in deep:
                deep[checking] = _deep_cursor(url, checking, depth)
            cursor = deep[checking]
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/transactions"
                        f"?limit=20&cursor={cursor}", "headers": auth_header})
        elif name == "statement":
            start = (now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
            end = (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/statement"
                        f"?from={start}&to={end}", "headers": auth_header})
    return out


def issue_cards(port, people, tokens, limit=CARD_USERS):
    """One debit card on the checking account of each of the first ``limit`` users."""
    cards = {}
    for user_id, _, accounts in people[:limit]:
        body = json.dumps({"account_id": accounts["checking"], "type": "debit",
                           "cardholder_name": "Bench User"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/cards", data=body,
                                     method="POST", headers={
                                         "Authorization": f"Bearer {tokens[user_id]}",
                                         "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            cards[user_id] = json.loads(resp.read())["id"]
    return cards


def _tokens(people):
    return {user_id: auth.issue_token(user_id)[0] for user_id, _, _ in people}


def as_of_requests(url, account_id, headers, *, count=AS_OF_INSTANTS,
                   before=AS_OF_BEFORE_FIRST, seed=0):
    """``GET /balance?as_of=`` at ``count`` distinct random instants of one account's history.

    ``count - before`` instants are spread uniformly between the account's
    first and last entry (``seed.seed_scaling_account`` stamps them one second
    apart, the last at seeding time), ``before`` more fall up to a day before
    its first entry; the list is shuffled so no run of them is served alike.
    """
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT min(created_at), max(created_at) FROM transactions "
                    "WHERE account_id = %s", (account_id,))
        first, last = cur.fetchone()
    conn.close()
    if first is None:
        raise BenchError(f"account {account_id} has no entries")
    rng = random.Random(seed)
    span = (last - first).total_seconds()

    def stamp(moment):
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    inside, earlier = set(), set()
    while len(inside) < count - before:
        inside.add(stamp(first + timedelta(seconds=rng.uniform(0, span))))
    while len(earlier) < before:
        earlier.add(stamp(first - timedelta(seconds=rng.uniform(0.001, 86_400))))
    instants = sorted(inside | earlier)
    rng.shuffle(instants)
    return [{"method": "GET", "path": f"/api/v1/accounts/{account_id}/balance?as_of={at}",
             "headers": headers} for at in instants]


def scaling(url, port, sizes, seconds, loadgen="auto"):
    """History pages and balances as of T in one account at each size; latencies must stay flat.

    Every account is seeded first and the writes settled (CHECKPOINT, ANALYZE)
    before any page is timed, so no size is measured while the server is still
    flushing the seed of another; each measurement starts with a short warm-up.
    """
    accounts = [(size, *seed.seed_scaling_account(url, size)) for size in sizes]
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CHECKPOINT")
        cur.execute("VACUUM ANALYZE transactions")
    conn.close()
    rows = []
    for size, user_id, account_id in accounts:
        token = auth.issue_token(user_id)[0]
        header = {"Authorization": f"Bearer {token}"}
        first = f"/api/v1/accounts/{account_id}/transactions?limit=20"
        deep = f"{first}&cursor={_deep_cursor(url, account_id, size // 2)}"
        for label, path in (("first", first), ("deep", deep)):
            request = [{"method": "GET", "path": path, "headers": header}]
            drive(port, 1, 1, request, loadgen=loadgen)  # warm-up: caches and plans
            row = summarise(f"history_{label}@{size}",
                            drive(port, 1, seconds, request, loadgen=loadgen))
            row.update({"entries": size, "kind": "history", "page": label, "clients": 1})
            rows.append(row)
            log.info("scaling %s page at %d entries: p50 %.2f ms", label, size, row["p50_ms"])
        request = as_of_requests(url, account_id, header, seed=size)
        drive(port, 1, 1, request, loadgen=loadgen)  # warm-up
        row = summarise(f"balance_as_of@{size}", drive(port, 1, seconds, request, loadgen=loadgen))
        row.update({"entries": size, "kind": "balance_as_of", "clients": 1})
        rows.append(row)
        log.info("scaling balance as of T at %d entries: p50 %.2f ms, p99 %.2f ms", size,
                 row["p50_ms"], row["p99_ms"])
    dbm.release_connection()
    return rows


def scenario_clients(name, clients):
    """``(scenario, clients)`` for a name such as ``transfer`` or ``deposit@32``."""
    base, _, fixed = name.partition("@")
    return base, int(fixed) if fixed else clients


def measure(server, name, requests, clients, seconds, *, loadgen, postgres, dbname):
    """One scenario against ``server``: throughput, latency and CPU per request."""
    drive(server.port, clients, 1, requests[:50], loadgen=loadgen)  # warm-up: pools, plans
    groups = {"app": server.processes}
    if postgres:
        groups["postgres"] = lambda: cpu.postgres_backends(postgres, dbname)
    meter = cpu.CpuMeter(groups).start()
    raw = drive(server.port, clients, seconds, requests, loadgen=loadgen)
    used = meter.stop()
    row = summarise(name, raw)
    row["clients"] = clients
    row["app_cpu_us"] = cpu.per_request_us(used["app"], row["requests"])
    row["pg_cpu_us"] = cpu.per_request_us(used.get("postgres"), row["requests"])
    return row


def postmaster_pid(url):
    """The PostgreSQL server's main process, when it runs on this machine (else None)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
        try:
            return psutil.Process(backend).ppid()
        except psutil.Error:
            return None
    finally:
        conn.close()


def serve_and_measure(server_name, names, ctx):
    """Every scenario of ``names`` under one server; returns that server's report part."""
    workers = ctx["workers"] or (DEFAULT_GRANIAN_WORKERS if server_name == "granian" else 1)
    part = {"server": server_name, "workers": workers, "threads": ctx["threads"],
            "scenarios": []}
    stamp = ctx["stamp"]
    if "bare" in names:
        bare = Server(ctx["url"], server_name, workers, ctx["threads"],
                      RESULTS_DIR / f"bare-{server_name}-{stamp}.log", app="bare")
        try:
            bare.wait_ready()
            requests = build_requests("bare", ctx["people"], ctx["tokens"], ctx["url"])
            part["scenarios"].append(measure(bare, "bare", requests, ctx["clients"],
                                             ctx["seconds"], loadgen=ctx["loadgen"],
                                             postgres=None, dbname=None))
        finally:
            bare.stop()
    server = Server(ctx["url"], server_name, workers, ctx["threads"],
                    RESULTS_DIR / f"server-{server_name}-{stamp}.log")
    try:
        server.wait_ready()
        if "card_payment" in names and not ctx.get("cards"):
            ctx["cards"] = issue_cards(server.port, ctx["people"], ctx["tokens"])
        for name in names:
            if name == "bare":
                continue
            base, clients = scenario_clients(name, ctx["clients"])
            requests = build_requests(base, ctx["people"], ctx["tokens"], ctx["url"],
                                      cards=ctx.get("cards"), depth=ctx["depth"])
            row = measure(server, name, requests, clients, ctx["seconds"],
                          loadgen=ctx["loadgen"], postgres=ctx["postmaster"],
                          dbname=ctx["dbname"])
            if base == "batch":
                row["legs"] = BATCH_LEGS
                row["legs_per_s"] = round(BATCH_LEGS * row["rps"], 1)
            part["scenarios"].append(row)
            log.info("%-8s %-16s %8.1f req/s  p99 %7.2f ms  app %s us  pg %s us  errors %d",
                     server_name, name, row["rps"], row["p99_ms"], row["app_cpu_us"],
                     row["pg_cpu_us"], row["errors"])
        if ctx["scaling_sizes"] and not ctx.get("scaling_done"):
            ctx["scaling_done"] = True
            ctx["report"]["scaling"] = scaling(ctx["url"], server.port, ctx["scaling_sizes"],
                                               ctx["seconds"], loadgen=ctx["loadgen"])
    finally:
        server.stop()
    part["peak_rss_mib_per_worker"] = round(server.peak_rss / 2 ** 20, 1)
    return part


def ceilings(ctx, settings):
    """The pgbench ceilings at ``--clients``: the ledger call and the whole keyed request.

    Then the ledger call with and without the chain hash (``chain_cost``), put
    straight into the report.
    """
    url, clients, seconds = ctx["url"], ctx["clients"], ctx["seconds"]
    groups = ({"postgres": lambda: cpu.postgres_backends(ctx["postmaster"], ctx["dbname"])}
              if ctx["postmaster"] else {})
    out = {}
    meter = cpu.CpuMeter(groups).start()
    row = summarise("ledger call (pgbench)", ceiling.measure(
        url, clients=clients, seconds=seconds, pairs=len(ctx["people"])))
    row["pg_cpu_us"] = cpu.per_request_us(meter.stop().get("postgres"), row["requests"])
    out["ledger"] = row
    if shutil.which("pgbench"):
        # init_db binds a new pool: close the old one's idle connections first
        # (nothing else would, and the chain cost needs the database to itself).
        dbm.close_db()
        dbm.init_db(settings)
        captured = replay.capture(settings, ctx["people"][0],
                                  ctx["tokens"][ctx["people"][0][0]])
        scripts = replay.scripts(captured, ctx["people"], ctx["tokens"])
        dbm.close_db()
        meter = cpu.CpuMeter(groups).start()
        row = summarise("full request (pgbench)", ceiling.run_pgbench(
            url, clients, seconds, scripts, defines={"hr_prepared": 0}))
        row["pg_cpu_us"] = cpu.per_request_us(meter.stop().get("postgres"), row["requests"])
        row["round_trips"] = len(captured["round_trips"])
        out["full"] = row
        ctx["report"]["captured"] = captured["round_trips"]
    # Last: copying the database checkpoints the server, whose next writes
    # then pay full-page images; no other ceiling should.
    ctx["report"]["chain_cost"] = chain_cost(ctx)
    return out


def chain_cost(ctx):
    """The ledger-call ceiling with the chain and with its hash neutralised (issue 14 item 2).

    Rounds of about half ``--seconds`` each on a copy of the bench database,
    the hash swapped in and out between rounds, medians compared; see
    ``ceiling.chain_cost``.
    """
    # CREATE DATABASE ... TEMPLATE needs the bench database to itself: the
    # server is stopped by now, pgbench has exited, and this closes the pool.
    dbm.close_db()
    seconds = max(1, -(-int(ctx["seconds"]) // 2))
    raw = ceiling.chain_cost(ctx["url"], clients=ctx["clients"], seconds=seconds,
                             pairs=len(ctx["people"]), rounds=CHAIN_ROUNDS,
                             postmaster=ctx["postmaster"])
    out = {"rounds": CHAIN_ROUNDS, "round_seconds": seconds}
    for variant, label in (("chain", "ledger call, with the chain"),
                           ("neutralised", ceiling.NEUTRALISED_LABEL)):
        rounds = raw[variant]
        merged = {"latencies": [x for r in rounds for x in r["latencies"]],
                  "errors": sum(r["errors"] for r in rounds),
                  "elapsed": sum(r["elapsed"] for r in rounds)}
        row = summarise(label, merged)
        row["rps"] = round(ceiling.median_rate(rounds), 1)  # the median round, not the mean
        row["rounds_rps"] = [round(ceiling.median_rate([r]), 1) for r in rounds]
        row["pg_cpu_us"] = cpu.per_request_us((raw["pg_cpu_s"] or {}).get(variant),
                                              row["requests"])
        out[variant] = row
    with_chain, without = out["chain"]["rps"], out["neutralised"]["rps"]
    out["slowdown_pct"] = round(100.0 * (1 - with_chain / max(without, 1e-9)), 1)
    # For information: CPU per call is less at the mercy of a busy machine than calls/s.
    cpu_with, cpu_without = out["chain"]["pg_cpu_us"], out["neutralised"]["pg_cpu_us"]
    out["pg_cpu_extra_pct"] = (round(100.0 * (cpu_with / cpu_without - 1), 1)
                               if cpu_with and cpu_without else None)
    log.info("chain cost: %.1f/s with the chain, %.1f/s with its hash neutralised: %.1f %% "
             "slower", with_chain, without, out["slowdown_pct"])
    return out


def run(*, clients=8, seconds=10, scenario=None, users=1000, accounts=2000, entries=200_000,
        threads=16, workers=None, server="granian", loadgen="auto", url=None,
        scaling_sizes=SCALING_SIZES, keep=True, quick=False):
    """Run the whole bench; return the report dict (also written under bench/results/)."""
    if quick:
        seconds, users, accounts, entries = (QUICK[k] for k in ("seconds", "users", "accounts",
                                                                "entries"))
        scaling_sizes = QUICK["scaling_sizes"] if scaling_sizes else ()
    url = url or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_URL
    servers = SERVERS if server == "both" else (server,)
    if any(s not in SERVERS for s in servers):
        raise BenchError(f"unknown server {server!r}: expected granian, waitress or both")
    names = tuple(SCENARIOS) if not scenario else tuple(s.strip() for s in scenario.split(","))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown scenario {unknown[0]!r}: expected one of "
                         + ", ".join(SCENARIOS))
    if loadgen == "wrk" and not wrk.available():
        raise BenchError("--loadgen wrk: wrk is not on the PATH (apt-get install wrk)")
    log.info("bench database %s", mask_url(url))
    recreate_database(url)
    settings = load_settings({"DATABASE_URL": url, "HOARDRUN_ENV": "production",
                              "HOARDRUN_SECRET_KEY": SECRET,
                              "HOARDRUN_CARD_ENCRYPTION_KEYS": CARD_KEY, **MAIL_ENV})
    database = dbm.init_db(settings)
    schema.migrate(database)
    from hoardrun.investments import load_default_prices
    load_default_prices()
    seeded = seed.seed(url, users=users, accounts=accounts, entries=entries)
    people = seeded["users"]
    tokens = _tokens(people)
    dbm.release_connection()

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    used_wrk = loadgen == "wrk" or (loadgen == "auto" and wrk.available())
    report = {"when": stamp, "machine": machine(), "clients": clients, "seconds": seconds,
              "threads": threads, "loadgen": "wrk" if used_wrk else "python",
              "seeded": {"users": users, "accounts": accounts, "entries": entries},
              "runs": []}
    ctx = {"url": url, "dbname": urlsplit(url).path.lstrip("/"), "people": people,
           "tokens": tokens, "clients": clients, "seconds": seconds, "threads": threads,
           "workers": workers, "loadgen": "wrk" if used_wrk else "python", "stamp": stamp,
           "postmaster": postmaster_pid(url), "scaling_sizes": scaling_sizes,
           "report": report, "depth": 5 if quick else 60}
    for name in servers:
        report["runs"].append(serve_and_measure(name, names, ctx))
    report["ceilings"] = ceilings(ctx, settings)
    database = dbm.init_db(settings)
    from hoardrun import ledger
    report["verify"] = ledger.verify()
    dbm.close_db()
    report["checks"] = checks(report)
    path = RESULTS_DIR / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["path"] = str(path)
    if not keep:
        drop_database(url)
    return report


def _check(out, name, measured, target, passed, note=""):
    out.append((name, measured, target, bool(passed), note))


def checks(report):
    """Each target of issues 12 (item 4), 13 and 14: (name, measured, target, passed, note)."""
    out = []
    full = report.get("ceilings", {}).get("full")
    item2 = "item 2: cash movements spread over settlement buckets (migration 009)"
    for run in report["runs"]:
        tag = f"[{run['server']} x{run['workers']}]"
        rows = {r["scenario"]: r for r in run["scenarios"]}
        transfer = rows.get("transfer")
        if transfer and full:
            ratio = transfer["rps"] / max(full["rps"], 1e-9)
            _check(out, f"{tag} transfer / full-request ceiling", round(ratio, 3),
                   TARGETS["full_ratio"], ratio >= TARGETS["full_ratio"])
        if transfer:
            cpu_us = transfer["app_cpu_us"]
            _check(out, f"{tag} app CPU per keyed transfer (us)", cpu_us,
                   TARGETS["transfer_app_cpu_us"],
                   cpu_us is not None and cpu_us <= TARGETS["transfer_app_cpu_us"])
            _check(out, f"{tag} transfer p99 ms at {transfer['clients']} clients",
                   transfer["p99_ms"], TARGETS["transfer_p99_ms"],
                   transfer["p99_ms"] < TARGETS["transfer_p99_ms"])
            for name, target in (("history_first", TARGETS["history_vs_transfer"]),
                                 ("history_deep", TARGETS["history_vs_transfer"]),
                                 ("statement", TARGETS["statement_vs_transfer"])):
                if name in rows:
                    ratio = rows[name]["rps"] / max(transfer["rps"], 1e-9)
                    _check(out, f"{tag} {name} / transfer", round(ratio, 2), target,
                           ratio >= target)
            if "batch" in rows:
                ratio = rows["batch"]["legs_per_s"] / max(transfer["rps"], 1e-9)
                _check(out, f"{tag} batch legs/s / transfer/s", round(ratio, 2),
                       TARGETS["batch_legs_vs_transfer"],
                       ratio >= TARGETS["batch_legs_vs_transfer"], "issue 13 item 2")
            for name, base in (("deposit", transfer), ("deposit@32", rows.get("transfer@32"))):
                if name in rows and base:
                    ratio = rows[name]["rps"] / max(base["rps"], 1e-9)
                    _check(out, f"{tag} {name} / {base['scenario']}", round(ratio, 2),
                           TARGETS["deposit_vs_transfer"],
                           ratio >= TARGETS["deposit_vs_transfer"], item2)
        if "deposit@32" in rows:
            _check(out, f"{tag} deposit p99 ms at 32 clients", rows["deposit@32"]["p99_ms"],
                   TARGETS["deposit32_p99_ms"],
                   rows["deposit@32"]["p99_ms"] < TARGETS["deposit32_p99_ms"], item2)
        if "health" in rows and "bare" in rows:
            ratio = rows["health"]["rps"] / max(rows["bare"]["rps"], 1e-9)
            _check(out, f"{tag} health / bare WSGI app", round(ratio, 2),
                   TARGETS["health_vs_bare"], ratio >= TARGETS["health_vs_bare"])
        _check(out, f"{tag} peak RSS MiB per worker", run["peak_rss_mib_per_worker"],
               TARGETS["rss_mib"], run["peak_rss_mib_per_worker"] < TARGETS["rss_mib"])
        errors = sum(r["errors"] for r in run["scenarios"])
        _check(out, f"{tag} errors", errors, 0, errors == 0)
    if report.get("scaling"):
        sizes = sorted({r["entries"] for r in report["scaling"]})
        span = f"{count_label(sizes[0])}..{count_label(sizes[-1])}"
        history = [r for r in report["scaling"] if r.get("kind", "history") == "history"]
        for page in ("first", "deep") if len(sizes) > 1 else ():
            p50s = [r["p50_ms"] for r in history if r["page"] == page]
            spread = max(p50s) / max(min(p50s), 1e-9)
            _check(out, f"history {page} page spread {span}", round(spread, 2),
                   TARGETS["scaling_spread"], spread <= TARGETS["scaling_spread"])
        as_of = as_of_rows(report)
        if as_of:
            item3 = "issue 13 item 3"
            largest = as_of[-1]
            _check(out, f"balance as of p99 ms at {count_label(largest['entries'])} entries",
                   largest["p99_ms"], TARGETS["as_of_p99_ms"],
                   largest["p99_ms"] < TARGETS["as_of_p99_ms"], item3)
            if len(as_of) > 1:
                spread = largest["p99_ms"] / max(as_of[0]["p99_ms"], 1e-9)
                _check(out, f"balance as of p99 spread {span}", round(spread, 2),
                       TARGETS["scaling_spread"], spread <= TARGETS["scaling_spread"], item3)
        errors = sum(r["errors"] for r in report["scaling"])
        _check(out, "scaling errors", errors, 0, errors == 0)
    chain = report.get("chain_cost")
    if chain:
        _check(out, "ledger call: % slower with the chain than with its hash neutralised",
               chain["slowdown_pct"], TARGETS["chain_slowdown_pct"],
               chain["slowdown_pct"] <= TARGETS["chain_slowdown_pct"], "issue 14 item 2")
    ceiling_errors = sum(r["errors"] for r in report.get("ceilings", {}).values())
    ceiling_errors += sum(chain[k]["errors"] for k in ("chain", "neutralised")) if chain else 0
    _check(out, "ceiling errors", ceiling_errors, 0, ceiling_errors == 0)
    _check(out, "db.verify problems", len(report["verify"]), 0, not report["verify"])
    return out


def count_label(n):
    """``10000`` -> ``10k``, ``1000000`` -> ``1M``; any other count as digits."""
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def as_of_rows(report):
    """The scaling step's balance-as-of rows, smallest account first."""
    return sorted((r for r in report.get("scaling") or () if r.get("kind") == "balance_as_of"),
                  key=lambda r: r["entries"])


def machine():
    """What the numbers were measured on."""
    import platform
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30),
            "python": platform.python_version(), "platform": platform.platform()}


def format_report(report):
    """The table the task prints."""
    head = (f"{'scenario':<38}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'app us':>9}{'pg us':>9}{'errors':>8}")
    lines = []
    if report["loadgen"] == "python":
        lines.append("NOTE: wrk is not on the PATH: the Python load generator ran on the same "
                     "cores as the server, so its CPU is part of what was measured "
                     "(apt-get install wrk)")
    ceil = report.get("ceilings", {})

    def fmt(r, label=None):
        def num(v):
            return f"{v:>9.0f}" if isinstance(v, (int, float)) else f"{'-':>9}"
        return (f"{(label or r['scenario']):<38}{r.get('clients', report['clients']):>8}"
                f"{r['rps']:>10.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                f"{num(r.get('app_cpu_us'))}{num(r.get('pg_cpu_us'))}{r['errors']:>8}")

    for run in report["runs"]:
        lines += ["", f"{run['server']}, {run['workers']} worker(s) x {run['threads']} threads, "
                      f"peak RSS per worker {run['peak_rss_mib_per_worker']} MiB", head]
        for r in run["scenarios"]:
            lines.append(fmt(r))
            lines.extend(f"    {sample}" for sample in r.get("error_samples", [])[:2])
        rows = {r["scenario"]: r for r in run["scenarios"]}
        if "transfer" in rows:
            t = rows["transfer"]["rps"]
            parts = [f"{label} ceiling {t / ceil[key]['rps']:.2f}"
                     for key, label in (("full", "API transfer / full-request"),
                                        ("ledger", "API transfer / ledger-call"))
                     if key in ceil and ceil[key]["rps"]]
            lines.append("  " + ";  ".join(parts))
        if "batch" in rows:
            b = rows["batch"]
            ratio = (f" = {b['legs_per_s'] / rows['transfer']['rps']:.2f} x transfer/s"
                     if rows.get("transfer", {}).get("rps") else "")
            lines.append(f"  batch: {b['legs_per_s']:.1f} legs/s ({b['legs']} legs x "
                         f"{b['rps']:.1f} batches/s){ratio}")
    if ceil:
        lines += ["", "ceilings (pgbench, no app)", head]
        lines += [fmt(r) for r in ceil.values()]
    chain = report.get("chain_cost")
    if chain:
        lines += ["", f"chain cost (ledger call, {chain['rounds']} alternating rounds of "
                      f"{chain['round_seconds']} s each, median round)", head]
        lines += [fmt(chain[k]) for k in ("chain", "neutralised")]
        lines.append(f"  calls/s per round: with the chain {chain['chain']['rounds_rps']}, "
                     f"hash neutralised {chain['neutralised']['rounds_rps']}")
        cpu_note = (f"; PostgreSQL CPU per call {chain['pg_cpu_extra_pct']:+} %"
                    if chain.get("pg_cpu_extra_pct") is not None else "")
        lines.append(f"  with the chain: {chain['slowdown_pct']} % slower (median rounds)"
                     + cpu_note)
    if report.get("scaling"):
        lines += ["", "history pages, 1 client", head]
        lines += [fmt(r) for r in report["scaling"] if r.get("kind", "history") == "history"]
    as_of = as_of_rows(report)
    if as_of:
        lines += ["", f"balance as of T, 1 client, {AS_OF_INSTANTS} random instants per account",
                  head]
        lines += [fmt(r) for r in as_of]
        if len(as_of) > 1:
            small, large = as_of[0], as_of[-1]
            lines.append(f"  largest / smallest account: p50 "
                         f"{large['p50_ms'] / max(small['p50_ms'], 1e-9):.2f} x, p99 "
                         f"{large['p99_ms'] / max(small['p99_ms'], 1e-9):.2f} x")
    lines.append("")
    lines.append(f"db.verify: {'clean' if not report['verify'] else report['verify'][:3]}")
    for name, measured, target, passed, note in report["checks"]:
        lines.append(f"{'PASS' if passed else 'FAIL'}  {name}: {measured} (target {target})"
                     + (f"  [{note}]" if note else ""))
    lines.append(f"results: {report['path']}")
    return "\n".join(lines)
