"""The database ceiling: the ledger's own transfer SQL, with no app in the way.

The statement is exactly what the API's transfer path sends for the money
movement (``hoardrun_transfer``: lock both accounts in id order, check,
update both balances, insert the transfer row and its two entries), driven
by pgbench when it is installed (simple protocol, as psycopg2 speaks), else
by psycopg2 threads, with the same number of clients as the API run.

The chain's cost (issue 14 item 2) is the same ledger call with
``hoardrun_entry_hash`` as installed and with its body swapped for a
constant: the writer and the commit-time trigger still run every rule and
still write and compare a 32-byte hash, only the sha256 over each entry's
canonical text is gone. Both run on one copy of the bench database (so the
data, its bloat and the caches are the same for both), in alternating
rounds, so what else the machine does that minute weighs on both alike.
"""

import glob
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import psycopg2
import psycopg2.errors

from . import cpu

TRANSFER_SQL = ("SELECT hoardrun_transfer(gen_random_uuid(), p.user_id, p.a1, p.a2, 1, 'USD', "
                "'TRF-' || replace(gen_random_uuid()::text, '-', ''), 'ceiling') "
                "FROM bench_pairs p WHERE p.n = {n}")
#: The chain hash as the ledger's writer and triggers call it (migration 010).
ENTRY_HASH = ("hoardrun_entry_hash(bytea, uuid, uuid, bigint, uuid, text, text, bigint, text, "
              "bigint, text, text, text, uuid, uuid, uuid, uuid, uuid, text, text, timestamptz, "
              "text, numeric)")
#: Its stand-in in the copy: a constant of the same type and length (sha256 of nothing).
CONSTANT_HASH = "SELECT sha256('\\x'::bytea)"
NEUTRALISED_LABEL = "ledger call, chain hash neutralised"


def measure(url, *, clients, seconds, pairs):
    """Transfers per second and latencies (ms) at ``clients`` concurrent sessions."""
    if shutil.which("pgbench"):
        return _pgbench(url, clients, seconds, pairs)
    return _threads(url, clients, seconds, pairs)


def connection_args(url):
    """``-h/-p/-U`` for a libpq client: the URL's query (``?host=/socket``) wins."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return ["-h", query.get("host") or parts.hostname or "127.0.0.1",
            "-p", str(query.get("port") or parts.port or 5432),
            "-U", query.get("user") or parts.username or "postgres"]


def _pgbench(url, clients, seconds, pairs):
    script = f"\\set n random(1, {pairs})\n" + TRANSFER_SQL.format(n=":n") + ";\n"
    return run_pgbench(url, clients, seconds, [script])


def run_pgbench(url, clients, seconds, scripts, defines=None):
    """Drive ``scripts`` (pgbench script texts, chosen at random per transaction).

    Simple protocol, as psycopg2 speaks; latencies from pgbench's per-transaction log.
    """
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, text in enumerate(scripts):
            path = os.path.join(tmp, f"script{i}.sql")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            files += ["-f", f"{path}@1"]
        env = dict(os.environ, PGPASSWORD=parts.password or "")
        cmd = ["pgbench", "-n", "-M", "simple", "-c", str(clients), "-j", str(min(clients, 2)),
               "-T", str(int(seconds)), *files, "-l", "--log-prefix",
               os.path.join(tmp, "lat"), *connection_args(url)]
        for name, value in (defines or {}).items():
            cmd += ["-D", f"{name}={value}"]
        cmd.append(parts.path.lstrip("/"))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError("pgbench failed: " + (done.stderr or done.stdout).strip()[-500:])
        latencies, failed = [], 0
        for path in glob.glob(os.path.join(tmp, "lat*")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    fields = line.split()
                    # client_id transaction_no time script_no time_epoch time_us
                    if fields[2] == "failed" or fields[2] == "skipped":
                        failed += 1
                    else:
                        latencies.append(int(fields[2]) / 1000.0)
    return {"tool": "pgbench", "latencies": latencies, "errors": failed,
            "elapsed": float(seconds), "error_samples": []}


def _threads(url, clients, seconds, pairs):
    out = {"tool": "psycopg2", "latencies": [], "errors": 0, "error_samples": []}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        latencies, errors = [], 0
        n = k
        while time.perf_counter() < stop_at:
            n = n % pairs + 1
            started = time.perf_counter()
            try:
                cur.execute(TRANSFER_SQL.format(n="%s"), (n,))
                cur.fetchall()
            except psycopg2.Error:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000.0)
        conn.close()
        with lock:
            out["latencies"].extend(latencies)
            out["errors"] += errors

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["elapsed"] = time.perf_counter() - started
    return out


def with_constant_body(ddl):
    """``pg_get_functiondef`` text with its SQL body replaced by ``CONSTANT_HASH``.

    The signature, volatility and the rest stay as installed, so CREATE OR
    REPLACE swaps the body only and every caller keeps calling the same function.
    """
    match = re.search(r"\bAS (\$[A-Za-z_]*\$)(.*)\1", ddl, re.DOTALL)
    if not match:
        raise ValueError("no dollar-quoted body in the function definition")
    return ddl[:match.start(2)] + f"\n    {CONSTANT_HASH}\n" + ddl[match.end(2):]


def _database_url(url, name):
    parts = urlsplit(url)
    return parts._replace(path=f"/{name}").geturl()


def _admin(url):
    conn = psycopg2.connect(_database_url(url, "postgres"))
    conn.autocommit = True
    return conn


def copy_of(url, attempts=3):
    """``<bench>_nochain``: a copy of the bench database, for the chain-cost rounds.

    ``CREATE DATABASE ... TEMPLATE`` needs the bench database to have no other
    sessions (PostgreSQL itself waits a few seconds for autovacuum to leave);
    the caller closes its own. Returns the copy's URL.
    """
    source = urlsplit(url).path.lstrip("/")
    name = f"{source}_nochain"
    conn = _admin(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version_num')::int")
            # FILE_COPY: one checkpoint and a file copy, instead of the whole
            # database written through the WAL (PostgreSQL 15's default).
            strategy = " STRATEGY = FILE_COPY" if cur.fetchone()[0] >= 150000 else ""
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for attempt in range(attempts):
                try:
                    cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"{strategy}')
                    break
                except psycopg2.errors.ObjectInUse:
                    if attempt + 1 == attempts:
                        cur.execute("SELECT pid, application_name, state, backend_start, "
                                    "left(query, 200) FROM pg_stat_activity WHERE datname = %s",
                                    (source,))
                        raise RuntimeError(f"cannot copy {source}: other sessions use it "
                                           f"{cur.fetchall()}") from None
                    time.sleep(2)
    finally:
        conn.close()
    return _database_url(url, name)


class ChainHash:
    """Swap the copy's ``hoardrun_entry_hash`` between its real body and ``CONSTANT_HASH``.

    Both variants then run on one database (same data, same bloat, same
    caches), so what differs between their rounds is the hash alone: the
    writer and the commit-time rules run either way.
    """

    def __init__(self, copy_url):
        self.url = copy_url
        conn = psycopg2.connect(copy_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_get_functiondef(%s::regprocedure)", (ENTRY_HASH,))
                self.real = cur.fetchone()[0]
        finally:
            conn.close()
        self.constant = with_constant_body(self.real)

    def use(self, variant):
        """Install the ``"chain"`` or the ``"neutralised"`` body; check it took."""
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(self.real if variant == "chain" else self.constant)
                cur.execute("SELECT pg_get_functiondef(%s::regprocedure)", (ENTRY_HASH,))
                hashes = "concat_ws" in cur.fetchone()[0]
        finally:
            conn.close()
        if hashes != (variant == "chain"):
            raise RuntimeError(f"the copy's chain hash did not switch to {variant!r}")


def drop_copy(copy_url):
    """Drop the copy, whoever is still connected to it."""
    name = urlsplit(copy_url).path.lstrip("/")
    if not name.endswith("_nochain"):
        raise ValueError(f"refusing to drop {name!r}: not a chain-cost copy")
    conn = _admin(copy_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def chain_cost(url, *, clients, seconds, pairs, rounds=3, postmaster=None):
    """The ledger call with the chain and with its hash neutralised, in turns, on one copy.

    A copy of the bench database is made; each round runs both variants on
    it, swapping the hash function's body in between (the order swapped
    every round: chain first, then neutralised first, ...), after a
    one-second warm-up of each; the copy is dropped at the end. Returns
    ``{"chain": [raw, ...], "neutralised": [raw, ...], "pg_cpu_s": {...}}``, a
    raw result per round as ``measure`` returns it; PostgreSQL's CPU is read
    when ``postmaster`` (its pid) is given.
    """
    copy = copy_of(url)
    try:
        hash_body = ChainHash(copy)
        dbname = urlsplit(copy).path.lstrip("/")
        groups = ({"pg": lambda: cpu.postgres_backends(postmaster, dbname)}
                  if postmaster else {})
        out = {"chain": [], "neutralised": [], "pg_cpu_s": {"chain": 0.0, "neutralised": 0.0}}
        for variant in ("chain", "neutralised"):
            hash_body.use(variant)
            measure(copy, clients=clients, seconds=1, pairs=pairs)  # warm-up: caches, plans
        for n in range(rounds):
            for variant in (("chain", "neutralised") if n % 2 == 0 else
                            ("neutralised", "chain")):
                hash_body.use(variant)
                meter = cpu.CpuMeter(groups).start()
                out[variant].append(measure(copy, clients=clients, seconds=seconds,
                                            pairs=pairs))
                out["pg_cpu_s"][variant] += meter.stop().get("pg", 0.0)
        if not postmaster:
            out["pg_cpu_s"] = None
        return out
    finally:
        drop_copy(copy)


def median_rate(raws):
    """The median over rounds of completed calls per second."""
    return statistics.median((len(r["latencies"]) - r["errors"]) / (r["elapsed"] or 1.0)
                             for r in raws)
