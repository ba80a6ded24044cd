"""`invoke bench`: seed a PostgreSQL bench database, serve the real app, measure.

One run: a dedicated database is (re)created, migrated and seeded; the app
runs under waitress in its own process on a free loopback port; a separate
load-generator process drives each scenario with N keep-alive clients; the
ledger's own transfer SQL is driven straight at PostgreSQL for the ceiling;
history pages are timed at 10k, 100k and 1M entries in one account. The
table is printed and written as JSON under bench/results/.
"""

import json
import logging
import os
import random
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
from hoardrun.config import load_settings, mask_url
from hoardrun.history import entries_cursor

from . import ceiling, seed

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
SCENARIOS = ("health", "health_database", "account", "transfer", "p2p", "history_first",
             "history_deep", "statement")
SCALING_SIZES = (10_000, 100_000, 1_000_000)
TARGETS = {"ratio": 0.5, "transfer_p99_ms": 50.0, "health_rps": 2000.0, "scaling_spread": 1.5,
           "rss_mib": 200.0}


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
    """The app under waitress in a child process, with its peak RSS sampled."""

    def __init__(self, url, threads, log_path):
        self.port = free_port()
        self.log_file = open(log_path, "w", encoding="utf-8")
        code = ("from hoardrun.api.serve import serve; "
                f"serve(host='127.0.0.1', port={self.port}, threads={threads})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                     env=server_environ(url), stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        process = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/api/health/readiness"
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
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_file.close()


#: Load-generator processes per scenario. Python clients share one GIL per
#: process; spreading the connections over a few processes keeps the
#: generator from being the bottleneck it measures (pgbench, for the ceiling,
#: is C).
LOADGEN_PROCESSES = 4


def drive(port, clients, seconds, requests, processes=None):
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


def build_requests(name, people, tokens, url, *, count=400):
    """The request list one scenario cycles through."""
    rng = random.Random(7)
    picks = [rng.randrange(len(people)) for _ in range(count)]
    now = datetime.now(timezone.utc)
    out = []
    for i in picks:
        user_id, email, accounts = people[i]
        auth_header = {"Authorization": f"Bearer {tokens[user_id]}"}
        checking, savings = accounts[0], accounts[-1]
        if name == "health":
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
        elif name == "p2p":
            other = people[(i + 1 + rng.randrange(len(people) - 1)) % len(people)]
            out.append({"method": "POST", "path": "/api/v1/p2p", "headers": auth_header,
                        "unique_key": True,
                        "body": {"from_account_id": checking, "recipient_email": other[1],
                                 "amount": "0.01", "note": "bench"}})
        elif name == "history_first":
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/transactions"
                        "?limit=20", "headers": auth_header})
        elif name == "history_deep":
            cursor = _deep_cursor(url, checking, 60)
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/transactions"
                        f"?limit=20&cursor={cursor}", "headers": auth_header})
        elif name == "statement":
            start = (now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
            end = (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            out.append({"method": "GET", "path": f"/api/v1/accounts/{checking}/statement"
                        f"?from={start}&to={end}", "headers": auth_header})
    return out


def _tokens(people):
    return {user_id: auth.issue_token(user_id)[0] for user_id, _, _ in people}


def scaling(url, port, sizes, seconds):
    """First and deep history pages for one account at each size; latencies must stay flat.

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
            drive(port, 1, 1, request)  # warm-up: caches and the connection's plans
            row = summarise(f"history_{label}@{size}", drive(port, 1, seconds, request))
            row.update({"entries": size, "page": label})
            rows.append(row)
            log.info("scaling %s page at %d entries: p50 %.2f ms", label, size, row["p50_ms"])
    dbm.release_connection()
    return rows


def run(*, clients=8, seconds=10, scenario=None, users=1000, accounts=2000, entries=200_000,
        threads=None, url=None, scaling_sizes=SCALING_SIZES, keep=True):
    """Run the whole bench; return the report dict (also written under bench/results/)."""
    url = url or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_URL
    threads = threads or max(16, clients)
    names = SCENARIOS if not scenario else tuple(s.strip() for s in scenario.split(","))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown scenario {unknown[0]!r}: expected one of "
                         + ", ".join(SCENARIOS))
    log.info("bench database %s", mask_url(url))
    recreate_database(url)
    settings = load_settings({"DATABASE_URL": url, "HOARDRUN_ENV": "production",
                              "HOARDRUN_SECRET_KEY": SECRET,
                              "HOARDRUN_CARD_ENCRYPTION_KEYS": CARD_KEY, **MAIL_ENV})
    database = dbm.init_db(settings)
    schema.migrate(database)
    seeded = seed.seed(url, users=users, accounts=accounts, entries=entries)
    people = seeded["users"]
    tokens = _tokens(people)
    dbm.release_connection()

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    server = Server(url, threads, RESULTS_DIR / f"server-{stamp}.log")
    report = {"when": stamp, "machine": machine(), "clients": clients, "seconds": seconds,
              "threads": threads, "seeded": {"users": users, "accounts": accounts,
                                             "entries": entries}, "scenarios": []}
    try:
        server.wait_ready()
        for name in names:
            requests = build_requests(name, people, tokens, url)
            row = summarise(name, drive(server.port, clients, seconds, requests))
            report["scenarios"].append(row)
            log.info("%-16s %8.1f req/s  p99 %7.2f ms  errors %d", name, row["rps"],
                     row["p99_ms"], row["errors"])
        cap = summarise("db_ceiling_transfer", ceiling.measure(
            url, clients=clients, seconds=seconds, pairs=len(people)))
        report["ceiling"] = cap
        if scaling_sizes:
            report["scaling"] = scaling(url, server.port, scaling_sizes, seconds)
    finally:
        server.stop()
    report["server_peak_rss_mib"] = round(server.peak_rss / 2 ** 20, 1)
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


def checks(report):
    """Each target of the benchmark issue: (name, measured, target, passed)."""
    rows = {r["scenario"]: r for r in report["scenarios"]}
    out = []
    for row in report["scenarios"]:
        out.append((f"{row['scenario']} errors", row["errors"], 0, row["errors"] == 0))
    if "transfer" in rows and report.get("ceiling"):
        ratio = rows["transfer"]["rps"] / max(report["ceiling"]["rps"], 1e-9)
        report["ratio"] = round(ratio, 3)
        out.append(("transfer / ceiling", round(ratio, 3), TARGETS["ratio"],
                    ratio >= TARGETS["ratio"]))
        out.append(("transfer p99 ms", rows["transfer"]["p99_ms"], TARGETS["transfer_p99_ms"],
                    rows["transfer"]["p99_ms"] < TARGETS["transfer_p99_ms"]))
    if "health" in rows:
        out.append(("health req/s", rows["health"]["rps"], TARGETS["health_rps"],
                    rows["health"]["rps"] >= TARGETS["health_rps"]))
    if report.get("scaling"):
        for page in ("first", "deep"):
            p50s = [r["p50_ms"] for r in report["scaling"] if r["page"] == page]
            spread = max(p50s) / max(min(p50s), 1e-9)
            out.append((f"history {page} page spread 10k..1M", round(spread, 2),
                        TARGETS["scaling_spread"], spread <= TARGETS["scaling_spread"]))
        out.extend((f"{r['scenario']} errors", r["errors"], 0, r["errors"] == 0)
                   for r in report["scaling"])
    out.append(("server peak RSS MiB", report["server_peak_rss_mib"], TARGETS["rss_mib"],
                report["server_peak_rss_mib"] < TARGETS["rss_mib"]))
    out.append(("db.verify problems", len(report["verify"]), 0, not report["verify"]))
    return out


def machine():
    """What the numbers were measured on."""
    import platform
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30),
            "python": platform.python_version(), "platform": platform.platform()}


def format_report(report):
    """The table the task prints."""
    lines = [f"{'scenario':<28}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
             f"{'errors':>8}"]
    rows = list(report["scenarios"])
    if report.get("ceiling"):
        rows.append(report["ceiling"])
    rows.extend(report.get("scaling", []))
    for r in rows:
        lines.append(f"{r['scenario']:<28}{r['rps']:>10.1f}{r['p50_ms']:>10.2f}"
                     f"{r['p95_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>8}")
        lines.extend(f"    {sample}" for sample in r.get("error_samples", [])[:2])
    lines.append("")
    lines.append(f"API transfer / DB ceiling: {report.get('ratio', 'n/a')}   "
                 f"server peak RSS: {report['server_peak_rss_mib']} MiB   "
                 f"db.verify: {'clean' if not report['verify'] else report['verify'][:3]}")
    lines.append("")
    for name, measured, target, passed in report["checks"]:
        lines.append(f"{'PASS' if passed else 'FAIL'}  {name}: {measured} (target {target})")
    lines.append(f"results: {report['path']}")
    return "\n".join(lines)
